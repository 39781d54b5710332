//! Model files and settings built to break the loader: each is an error naming what is wrong, never a panic,
//! an abort or an allocation sized by the file.

mod common;

use candle_core::quantized::gguf_file::Value;
use common::tiny::{write_gguf_with, write_hf_dir, Damage, TinyArch, TinySpec};
use pmkvq::kvcache::{KvError, KvGeometry, KvMethod};
use pmkvq::model::{LoadOptions, Model, ModelError};
use std::path::Path;

fn load_err(path: &Path) -> ModelError {
    let r = std::panic::catch_unwind(|| Model::load(path, &LoadOptions { threads: 1 }));
    match r {
        Err(_) => panic!("{}: the loader panicked", path.display()),
        Ok(Ok(_)) => panic!("{} loaded but should not", path.display()),
        Ok(Err(e)) => e,
    }
}

#[test]
fn hostile_gguf_headers_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(TinyArch::Llama);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("general.alignment", Value::U32(0), "malformed"),
        ("ARCH.block_count", Value::U32(u32::MAX), "block_count must be <= 4096"),
        ("ARCH.block_count", Value::U64(1 << 60), "block_count must be <= 4096"),
        ("ARCH.context_length", Value::U32(0), "context_length must be >= 2"),
        ("ARCH.attention.key_length", Value::U32(0), "zero-sized geometry"),
    ];
    for (i, (key, value, want)) in cases.into_iter().enumerate() {
        let p = write_gguf_with(
            &spec,
            &dir.path().join(format!("h{i}.gguf")),
            Damage::None,
            &[(key, value)],
        );
        let e = load_err(&p);
        assert!(
            matches!(e, ModelError::Format { .. }) && e.to_string().contains(want),
            "{key}: {e}"
        );
    }
}

#[test]
fn a_byte_token_shorter_than_its_form_is_no_panic() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(TinyArch::Llama);
    let n = spec.vocab;
    // a SentencePiece vocabulary whose byte-type tokens are `<0x`, `<0xé` and `<`
    let mut toks = common::tiny::vocab(n);
    toks[10] = "<0x".into();
    toks[11] = "<0x\u{e9}".into();
    toks[12] = "<".into();
    let kinds: Vec<Value> = (0..n)
        .map(|i| {
            Value::I32(if i < 3 {
                3
            } else if (10..13).contains(&i) {
                6
            } else {
                1
            })
        })
        .collect();
    let p = write_gguf_with(
        &spec,
        &dir.path().join("bytes.gguf"),
        Damage::None,
        &[
            ("tokenizer.ggml.model", Value::String("llama".into())),
            (
                "tokenizer.ggml.tokens",
                Value::Array(toks.iter().map(|t| Value::String(t.clone())).collect()),
            ),
            (
                "tokenizer.ggml.scores",
                Value::Array((0..n).map(|_| Value::F32(0.0)).collect()),
            ),
            ("tokenizer.ggml.token_type", Value::Array(kinds)),
        ],
    );
    let r = std::panic::catch_unwind(|| Model::load(&p, &LoadOptions { threads: 1 }));
    let (_, tok) = r
        .expect("no panic")
        .expect("a byte token with no hex digits is kept as its text");
    assert_eq!(tok.token_bytes(10, false), b"<0x");
    assert_eq!(tok.token_bytes(12, false), b"<");
}

#[test]
fn a_special_token_id_beyond_the_vocabulary_is_an_error() {
    // an id past the model's embedding (EOS candidates are looked up by id), and one that would size the
    // per-token tables at four billion entries
    for (i, id) in [100_000u64, 4_000_000_000].into_iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let spec = TinySpec::new(TinyArch::Qwen2);
        let d = write_hf_dir(&spec, dir.path());
        let path = d.join("tokenizer.json");
        let mut tj: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        tj["model"]["vocab"]["<|eot_id|>"] = serde_json::json!(id);
        tj["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": id, "content": "<|eot_id|>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
        std::fs::write(&path, serde_json::to_string(&tj).unwrap()).unwrap();
        let e = load_err(&d);
        assert!(e.to_string().contains("beyond the vocabulary"), "case {i}: {e}");
    }
}

#[test]
fn a_head_dimension_no_packed_cache_accepts_is_an_error_naming_the_fp16_cache() {
    let geom = KvGeometry {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 6,
    };
    for name in ["pmkvq", "rtn:4", "q8_0", "kivi:2"] {
        let m: KvMethod = name.parse().unwrap();
        let r = std::panic::catch_unwind(|| m.new_store(geom, None, 64).map(|_| ()));
        let e = r.unwrap_or_else(|_| panic!("{name}: panicked")).expect_err(name);
        assert!(matches!(e, KvError::BadGroup { .. }), "{name}: {e}");
        assert!(e.to_string().contains("fp16"), "{e}");
    }
    assert!(KvMethod::Fp16.new_store(geom, None, 64).is_ok());
}

#[test]
fn config_durations_that_overflow_are_errors() {
    let r = std::panic::catch_unwind(|| pmkvq::config::from_pairs(&[("shutdown.grace", "99999999999999999999s")]));
    let e = r.expect("no panic").expect_err("refused");
    assert!(e.to_string().contains("shutdown.grace"), "{e}");
}

#[cfg(target_arch = "x86_64")]
#[test]
fn the_q4_1_dot_checks_the_block_sums_it_reads() {
    use pmkvq::cpu::{kernels, BlockFormat, Q8Row};
    let k = kernels();
    let blocks = 4;
    let row = vec![0u8; blocks * BlockFormat::Q4_1.block_bytes()];
    let x = Q8Row {
        d: vec![1.0; blocks],
        s: Vec::new(), // Q4_1 needs one sum per block
        qs: vec![1; blocks * 32],
    };
    let r = std::panic::catch_unwind(|| (k.dot_q4_1)(&row, &x));
    assert!(
        r.is_err(),
        "a short block-sum row must be refused, not read out of bounds"
    );
}
