//! Our fp16-KV path against llama.cpp's reference outputs on the default model (shared/golden).

mod common;

use common::{golden, load_default, log_softmax};
use pmkvq::engine::sampler::argmax;
use pmkvq::engine::{generate, GenerateRequest, SamplingParams};
use pmkvq::kvcache::F16KvStore;
use pmkvq::model::chat::ChatTemplate;
use pmkvq::model::LogitsMode;

/// Below this top-1/top-2 margin llama.cpp's own rounding may flip the argmax: positions are not compared.
const MIN_MARGIN: f64 = 0.1;

// How close two correct implementations can be on this model. SmolLM2-135M carries massive activations
// (|x| ≈ 25,000 in the first token's residual stream from layer 11 on), and llama.cpp's f16 cache rounds Q, K,
// V and the attention probabilities to 11 bits; a last-bit difference anywhere upstream flips some of those
// roundings. Measured with llama.cpp itself (the same build that made the golden file, same machine, via
// `scripts/peer-logprob-noise.sh`): `-fa on` moves these top-10 log-probs by mean 0.112 / max 0.382, and
// `-ub 1` (only the summation order changes) by mean 0.065 / max 0.276. The 0.05 per token is below the
// peer's own reproducibility; we hold ours to the envelope of llama.cpp's own settings.
/// Largest allowed |Δ log-prob| of one top-10 token.
const MAX_LOGPROB_DELTA: f64 = 0.4;
/// Largest allowed mean |Δ log-prob| over all top-10 tokens of all cases.
const MEAN_LOGPROB_DELTA: f64 = 0.12;
/// Teacher-forced argmax must agree at this share of the positions whose golden margin is ≥ MIN_MARGIN...
const MIN_ARGMAX_AGREEMENT: f64 = 0.98;
/// ...and at every position whose golden margin is at least this (no flip can be blamed on rounding there).
const SURE_MARGIN: f64 = 1.0;

#[test]
fn tokenizer_and_chat_template_match_llama_cpp() {
    let (_model, tok) = load_default(1);
    let g = golden();
    let tmpl_src = tok.chat_template.clone().expect("model ships a chat template");
    assert_eq!(tmpl_src, g.chat_template, "template read from GGUF metadata");
    let tmpl = ChatTemplate::new(&tmpl_src).unwrap();
    for c in &g.cases {
        let rendered = tmpl.render(&c.messages, true, "", "").unwrap();
        assert_eq!(rendered, c.prompt_text, "{}: chat template", c.id);
        let ids = tok.encode(&c.prompt_text, true).unwrap();
        assert_eq!(ids, c.prompt_ids, "{}: tokenization", c.id);
        // and back: decoding with special tokens reproduces the text
        assert_eq!(tok.decode(&ids, true), c.prompt_text, "{}: decode", c.id);
    }
}

#[test]
fn teacher_forced_logits_match_llama_cpp() {
    let (model, _tok) = load_default(2);
    let g = golden();
    let (mut compared, mut agreed) = (0usize, 0usize);
    let mut deltas = Vec::new();
    for c in &g.cases {
        let mut kv = F16KvStore::new(model.kv_geometry(), model.config.context_length);
        let mut all: Vec<u32> = c.prompt_ids.clone();
        all.extend(&c.greedy_ids);
        let logits = model.forward_chunked(&all, &mut kv, 64, LogitsMode::All).unwrap();
        let vocab = model.config.vocab_size;
        let row = |i: usize| &logits[i * vocab..(i + 1) * vocab];
        let p = c.prompt_ids.len();
        // top-10 log-probs at the last prompt position
        let lp = log_softmax(row(p - 1));
        for &(t, want) in &c.last_prompt_top10 {
            let d = (lp[t as usize] - want).abs();
            assert!(
                d <= MAX_LOGPROB_DELTA,
                "{}: logprob of token {t}: ours {:.4}, llama.cpp {want:.4}",
                c.id,
                lp[t as usize]
            );
            deltas.push(d);
        }
        for (i, (&want, &margin)) in c.greedy_ids.iter().zip(&c.greedy_margins).enumerate() {
            if margin < MIN_MARGIN {
                continue;
            }
            let got = argmax(row(p - 1 + i));
            compared += 1;
            if got == want {
                agreed += 1;
            } else {
                assert!(
                    margin < SURE_MARGIN,
                    "{}: step {i}: ours {got}, llama.cpp {want} with margin {margin:.3}",
                    c.id
                );
                eprintln!(
                    "{}: step {i}: argmax {got} vs llama.cpp {want} (golden margin {margin:.3})",
                    c.id
                );
            }
        }
    }
    let mean = deltas.iter().sum::<f64>() / deltas.len() as f64;
    let share = agreed as f64 / compared as f64;
    eprintln!(
        "top-10 |Δ logprob| mean {mean:.4} over {}; argmax agreement {agreed}/{compared} = {share:.4}",
        deltas.len()
    );
    assert!(
        mean <= MEAN_LOGPROB_DELTA,
        "mean |Δ logprob| {mean:.4} > {MEAN_LOGPROB_DELTA}"
    );
    assert!(compared > 500, "compared only {compared} positions");
    assert!(
        share >= MIN_ARGMAX_AGREEMENT,
        "argmax agreement {share:.4} < {MIN_ARGMAX_AGREEMENT}"
    );
}

#[test]
fn free_running_greedy_reproduces_llama_cpp() {
    let (model, tok) = load_default(2);
    let g = golden();
    for c in &g.cases {
        let upto = c
            .greedy_margins
            .iter()
            .position(|&m| m < MIN_MARGIN)
            .unwrap_or(c.greedy_ids.len());
        // Generate through the first low-margin position: its token must still match (only later ones may not).
        let n = (upto + 1).min(c.greedy_ids.len());
        let mut kv = F16KvStore::new(model.kv_geometry(), model.config.context_length);
        let req = GenerateRequest {
            prompt_ids: c.prompt_ids.clone(),
            max_tokens: n,
            sampling: SamplingParams::default(),
            stop: vec![],
            prefill_chunk: 512,
        };
        let out = generate(&model, &tok, &mut kv, &req, |_| {}, |_| {}).unwrap();
        let want = &c.greedy_ids[..upto.min(out.ids.len())];
        assert_eq!(
            &out.ids[..want.len()],
            want,
            "{}: greedy tokens before the first margin < {MIN_MARGIN}",
            c.id
        );
    }
}
