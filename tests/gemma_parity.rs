//! Gemma-3-270M (the real model, fetched by the test command) against llama.cpp's outputs
//! (tests/golden/gemma3-270m.json, made by scripts/gemma-golden.py): tokenizer, teacher-forced log-probs on the
//! shared prompts and on a 2,048-token text (four times the local layers' 512-token window), and free-running
//! greedy tokens. The fp16 cache is the one llama.cpp runs by default (f16 K/V in every layer, windows included).

mod common;

use common::log_softmax;
use pmkvq::engine::sampler::argmax;
use pmkvq::engine::{generate, GenerateRequest, SamplingParams};
use pmkvq::kvcache::{KvMethod, KvStore, MethodSpec};
use pmkvq::model::{Backend, LoadOptions, LogitsMode, Model, Tokenizer};
use std::path::PathBuf;

// Tolerances come from the peer's own reproducibility on this model, measured by scripts/gemma-golden.py and
// stored in the golden file (`peer_noise`): llama.cpp with flash attention on, against itself with it off,
// moves the long text's top-10 log-probs by mean 0.142 / max 0.762, and flips its own greedy tokens at golden
// margins up to 0.117 — Gemma-3-270M is several times more sensitive to last-bit rounding than SmolLM2
// (0.112 / 0.382 there). Ours is held to 1.5× the peer's spread, and greedy tokens to 2× its flip margin.
const NOISE_FACTOR: f64 = 1.5;
const MARGIN_FACTOR: f64 = 2.0;
/// Teacher-forced argmax agreement at positions whose golden margin is at least the greedy threshold, and at
/// every position whose margin is at least SURE_MARGIN.
const MIN_ARGMAX_AGREEMENT: f64 = 0.98;
const SURE_MARGIN: f64 = 1.0;

struct Tolerance {
    max_delta: f64,
    mean_delta: f64,
    min_margin: f64,
}

fn tolerance(g: &serde_json::Value) -> Tolerance {
    let n = &g["peer_noise"];
    let flips = n["flip_margins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_f64().unwrap());
    Tolerance {
        max_delta: NOISE_FACTOR * n["long_max"].as_f64().unwrap(),
        mean_delta: NOISE_FACTOR * n["long_mean"].as_f64().unwrap(),
        min_margin: MARGIN_FACTOR * flips.fold(0.1, f64::max),
    }
}

fn gemma_path() -> PathBuf {
    let p = std::env::var_os("PMKVQ_GEMMA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        p.exists(),
        "Gemma-3-270M missing at {}: run `deploy/fetch-model.sh models gemma3` (the test command does)",
        p.display()
    );
    p
}

fn load(threads: usize) -> (Model, Tokenizer) {
    Model::load(&gemma_path(), &LoadOptions { threads }).expect("gemma loads")
}

fn golden() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gemma3-270m.json");
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn top10(v: &serde_json::Value) -> Vec<(u32, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e["token"].as_u64().unwrap() as u32, e["logprob"].as_f64().unwrap()))
        .collect()
}

fn fp16(model: &Model, max: usize) -> Box<dyn KvStore> {
    model
        .new_store(
            &MethodSpec::plain(KvMethod::Fp16, None, "fp16"),
            model.kv_geometry(),
            max,
        )
        .unwrap()
}

#[test]
fn geometry_and_sliding_layers_are_read_from_the_file() {
    let (model, tok) = load(1);
    let c = &model.config;
    assert_eq!(
        (c.layers, c.hidden, c.heads, c.kv_heads, c.head_dim),
        (18, 640, 4, 1, 256)
    );
    let sw = c.sliding.as_ref().expect("gemma3 has sliding-window layers");
    assert_eq!(sw.window, 512);
    let globals: Vec<usize> = (0..c.layers).filter(|&l| !c.is_local(l)).collect();
    assert_eq!(globals, vec![5, 11, 17], "every sixth layer is global");
    assert_eq!((c.rope.theta, sw.rope.theta), (1_000_000.0, 10_000.0));
    assert!(tok.vocab_size() == 262_144 && c.vocab_size == 262_144);
    let g = golden();
    assert_eq!(g["model_file"], "gemma-3-270m-q4_k_m.gguf");
}

#[test]
fn tokenizer_matches_llama_cpp() {
    let (_model, tok) = load(1);
    let g = golden();
    for c in g["cases"].as_array().unwrap() {
        let text = c["prompt_text"].as_str().unwrap();
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&c["prompt_ids"]),
            "{}: tokenization",
            c["id"]
        );
    }
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let (model, _tok) = load(2);
    let g = golden();
    let tol = tolerance(&g);
    let vocab = model.config.vocab_size;
    let (mut compared, mut agreed) = (0usize, 0usize);
    let mut deltas = Vec::new();
    let check = |what: &str, lp: &[f64], want: &[(u32, f64)], deltas: &mut Vec<f64>| {
        for &(t, w) in want {
            let d = (lp[t as usize] - w).abs();
            assert!(
                d <= tol.max_delta,
                "{what}: logprob of token {t}: ours {:.4}, llama.cpp {w:.4}",
                lp[t as usize]
            );
            deltas.push(d);
        }
    };
    for c in g["cases"].as_array().unwrap() {
        let (prompt, greedy) = (ids(&c["prompt_ids"]), ids(&c["greedy_ids"]));
        let margins: Vec<f64> = c["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let mut all = prompt.clone();
        all.extend(&greedy);
        let mut kv = fp16(&model, all.len() + 1);
        let logits = model.forward_chunked(&all, kv.as_mut(), 64, LogitsMode::All).unwrap();
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let p = prompt.len();
        check(
            c["id"].as_str().unwrap(),
            &log_softmax(row(p - 1)),
            &top10(&c["last_prompt_top10"]),
            &mut deltas,
        );
        for (i, (&want, &margin)) in greedy.iter().zip(&margins).enumerate() {
            if margin < tol.min_margin {
                continue;
            }
            let got = argmax(row(p - 1 + i));
            compared += 1;
            if got == want {
                agreed += 1;
            } else {
                assert!(
                    margin < SURE_MARGIN,
                    "{}: step {i}: ours {got}, llama.cpp {want} (margin {margin:.3})",
                    c["id"]
                );
            }
        }
    }
    // the long text: positions up to 2,047, four windows deep
    let long = &g["long"];
    let all = ids(&long["prompt_ids"]);
    let mut kv = fp16(&model, all.len() + 1);
    let logits = model.forward_chunked(&all, kv.as_mut(), 512, LogitsMode::All).unwrap();
    let mut long_deltas = Vec::new();
    for (pos, want) in long["positions"]
        .as_array()
        .unwrap()
        .iter()
        .zip(long["top10"].as_array().unwrap())
    {
        let i = pos.as_u64().unwrap() as usize;
        let lp = log_softmax(&logits[i * vocab..(i + 1) * vocab]);
        check(&format!("long text, position {i}"), &lp, &top10(want), &mut long_deltas);
    }
    let mean = |d: &[f64]| d.iter().sum::<f64>() / d.len() as f64;
    let share = agreed as f64 / compared as f64;
    eprintln!(
        "top-10 |Δ logprob| mean {:.4} (prompts) {:.4} (long text, {} positions); argmax agreement {agreed}/{compared}",
        mean(&deltas),
        mean(&long_deltas),
        long["positions"].as_array().unwrap().len()
    );
    assert!(
        mean(&deltas) <= tol.mean_delta,
        "prompts: mean |Δ logprob| {:.4}",
        mean(&deltas)
    );
    assert!(
        mean(&long_deltas) <= tol.mean_delta,
        "long text: mean |Δ logprob| {:.4}",
        mean(&long_deltas)
    );
    assert!(compared > 300, "compared only {compared} positions");
    assert!(
        share >= MIN_ARGMAX_AGREEMENT,
        "argmax agreement {share:.4} < {MIN_ARGMAX_AGREEMENT}"
    );
}

#[test]
fn free_running_greedy_reproduces_llama_cpp() {
    let (model, tok) = load(2);
    let g = golden();
    let min_margin = tolerance(&g).min_margin;
    for c in g["cases"].as_array().unwrap() {
        let greedy = ids(&c["greedy_ids"]);
        let margins: Vec<f64> = c["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let upto = margins.iter().position(|&m| m < min_margin).unwrap_or(greedy.len());
        let n = (upto + 1).min(greedy.len());
        let prompt = ids(&c["prompt_ids"]);
        let mut kv = fp16(&model, prompt.len() + n + 1);
        let req = GenerateRequest {
            prompt_ids: prompt,
            max_tokens: n,
            sampling: SamplingParams::default(),
            stop: vec![],
            prefill_chunk: 512,
        };
        let out = generate(&model, &tok, kv.as_mut(), &req, |_| {}, |_| {}).unwrap();
        let want = &greedy[..upto.min(out.ids.len())];
        assert_eq!(
            &out.ids[..want.len()],
            want,
            "{}: greedy tokens before the first margin < {min_margin}",
            c["id"]
        );
    }
}
