//! Llama, Qwen2 and Qwen3 against llama.cpp itself, not only against our own two loaders: tiny random-weight
//! models (`tests/common/tiny.rs::parity_specs`, f32 weights) whose logits llama.cpp computed at every position of
//! a 40-token prompt and a 24-token greedy continuation (`tests/golden/llamacpp-tiny.json`, written by
//! `scripts/llamacpp-parity.sh` with llama-cpp-python 0.3.36). The files are rebuilt here from the same code and
//! checked against the hashes llama.cpp saw, so the reference cannot silently describe another model.

mod common;

use common::tiny::{parity_specs, write_parity_gguf};
use pmkvq::kvcache::F16KvStore;
use pmkvq::model::{LoadOptions, LogitsMode, Model};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// Largest difference allowed, relative to the position's largest |logit| (llama.cpp stores K/V as f16, as we
/// do here; its f32 matmuls sum in another order).
const REL_TOL: f64 = 3e-3;
/// Greedy tokens must agree wherever llama.cpp's top-2 margin is at least this.
const MARGIN: f64 = 0.1;

fn golden() -> Value {
    let p = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/llamacpp-tiny.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tiny_llama_qwen2_qwen3_match_llama_cpp_at_every_position() {
    let g = golden();
    let dir = tempfile::tempdir().unwrap();
    for (name, spec) in parity_specs() {
        let file = format!("{name}.gguf");
        let r = g["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["model"] == file.as_str())
            .unwrap_or_else(|| panic!("{file} missing from the golden file"));
        let path = write_parity_gguf(&spec, &dir.path().join(&file));
        let sha = format!("{:x}", Sha256::digest(std::fs::read(&path).unwrap()));
        assert_eq!(
            sha, r["sha256"],
            "{file}: the tiny model writer changed since llama.cpp's reference was made; run \
             scripts/llamacpp-parity.sh"
        );
        let (model, _) = Model::load(&path, &LoadOptions { threads: 1 }).unwrap();
        assert_eq!(format!("{:?}", model.config.arch).to_lowercase(), r["architecture"]);
        let (prompt, greedy) = (ids(&r["prompt_ids"]), ids(&r["greedy_ids"]));
        let mut tokens = prompt.clone();
        tokens.extend_from_slice(&greedy[..greedy.len() - 1]);
        let mut kv = F16KvStore::new(model.kv_geometry(), 256);
        // chunks of 16, as llama.cpp's n_batch: attention over cached and fresh tokens both
        let ours = model.forward_chunked(&tokens, &mut kv, 16, LogitsMode::All).unwrap();
        let vocab = model.config.vocab_size;
        let want = r["logits"].as_array().unwrap();
        assert_eq!(want.len(), tokens.len());
        let mut worst = 0f64;
        for (pos, row) in want.iter().enumerate() {
            let row: Vec<f64> = row.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
            let got = &ours[pos * vocab..(pos + 1) * vocab];
            let scale = row.iter().fold(0f64, |m, v| m.max(v.abs()));
            let diff = row.iter().zip(got).fold(0f64, |m, (w, o)| m.max((w - *o as f64).abs()));
            worst = worst.max(diff / scale);
            assert!(
                diff <= REL_TOL * scale,
                "{name}: position {pos}: max |logit difference| {diff:.2e} over scale {scale:.2}"
            );
        }
        // Greedy: our argmax is llama.cpp's choice wherever its top-2 margin is clear (teacher-forced on its tokens,
        // so one close call does not end the comparison).
        let margins: Vec<f64> = r["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut agreed = 0;
        for (i, (&tok, &m)) in greedy.iter().zip(&margins).enumerate() {
            if m < MARGIN {
                continue;
            }
            let pos = prompt.len() - 1 + i;
            let row = &ours[pos * vocab..(pos + 1) * vocab];
            let arg = (0..vocab).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
            assert_eq!(arg, tok, "{name}: greedy token {i}");
            agreed += 1;
        }
        assert!(
            agreed >= 12,
            "{name}: only {agreed} greedy tokens had a margin >= {MARGIN}"
        );
        eprintln!("{name}: worst relative logit difference {worst:.2e}; {agreed} greedy tokens agree");
    }
}
