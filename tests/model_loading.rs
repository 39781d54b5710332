//! Loading models from both formats, both RoPE layouts, and every way a model file can be wrong.

mod common;

use common::tiny::{write_gguf, write_hf_dir, Damage, TinyArch, TinySpec};
use pmkvq::kvcache::{F16KvStore, KvStore};
use pmkvq::model::{LoadOptions, LogitsMode, Model, ModelError, RopeLayout};
use std::path::Path;

fn logits(path: &Path, tokens: &[u32]) -> (Vec<f32>, Model) {
    let (model, _tok) = Model::load(path, &LoadOptions { threads: 1 }).expect("tiny model loads");
    let mut kv = F16KvStore::new(model.kv_geometry(), 256);
    // two chunks, so attention over stored tokens and over the new chunk are both exercised
    let l = model.forward_chunked(tokens, &mut kv, 5, LogitsMode::All).unwrap();
    (l, model)
}

fn assert_close(a: &[f32], b: &[f32], rel: f32, what: &str) {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * scale,
            "{what}: element {i}: {x} vs {y} (scale {scale})"
        );
    }
}

/// The same network as GGUF and as safetensors gives the same logits: proves both loaders, the llama.cpp
/// row permutation + interleaved RoPE against HF's NeoX RoPE, (qwen2) the q/k/v biases, (qwen3) the q/k norms
/// and a head size that is not hidden / heads.
#[test]
fn gguf_and_safetensors_give_the_same_logits() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..9).map(|i| (i * 7 + 3) % 64).collect();
    for arch in [TinyArch::Llama, TinyArch::Qwen2, TinyArch::Qwen3] {
        let mut spec = TinySpec::new(arch);
        if arch == TinyArch::Qwen3 {
            // as in the real Qwen3 models, the q dimension differs from the hidden size
            spec.head_dim = Some(24);
        }
        let g = write_gguf(&spec, &dir.path().join(format!("{arch:?}.gguf")), Damage::None);
        let h = write_hf_dir(&spec, &dir.path().join(format!("{arch:?}-hf")));
        let (lg, mg) = logits(&g, &tokens);
        let (lh, mh) = logits(&h, &tokens);
        let want_layout = if arch == TinyArch::Llama {
            RopeLayout::Interleaved
        } else {
            RopeLayout::Neox
        };
        assert_eq!(mg.config.rope.layout, want_layout);
        assert_eq!(mh.config.rope.layout, RopeLayout::Neox);
        assert_close(&lg, &lh, 1e-4, &format!("{arch:?} gguf vs safetensors"));
    }
}

#[test]
fn tokenizers_from_both_formats_agree() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(TinyArch::Llama);
    let (_, tg) = Model::load(
        &write_gguf(&spec, &dir.path().join("t.gguf"), Damage::None),
        &LoadOptions::default(),
    )
    .unwrap();
    let (_, th) = Model::load(&write_hf_dir(&spec, &dir.path().join("hf")), &LoadOptions::default()).unwrap();
    let text = "<|im_start|>abc de<|im_end|>";
    let a = tg.encode(text, false).unwrap();
    assert_eq!(a, th.encode(text, false).unwrap());
    assert_eq!(a[0], 1, "special token recognised in text");
    assert_eq!(tg.decode(&a, true), text);
    assert!(tg.is_eos(2) && th.is_eos(2));
}

fn load_err(path: &Path) -> ModelError {
    match Model::load(path, &LoadOptions { threads: 1 }) {
        Ok(_) => panic!("{} loaded but should not", path.display()),
        Err(e) => e,
    }
}

#[test]
fn malformed_gguf_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(TinyArch::Llama);
    let good = write_gguf(&spec, &dir.path().join("good.gguf"), Damage::None);
    let bytes = std::fs::read(&good).unwrap();

    // truncated in the middle of the tensor data
    let p = dir.path().join("truncated.gguf");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&p);
    assert!(matches!(e, ModelError::Format { .. }), "{e}");
    assert!(e.to_string().contains("truncated.gguf"), "names the file: {e}");

    // truncated inside the header
    let p = dir.path().join("header.gguf");
    std::fs::write(&p, &bytes[..40]).unwrap();
    assert!(matches!(load_err(&p), ModelError::Format { .. }));

    // bad magic
    let p = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"NOPE");
    std::fs::write(&p, &b).unwrap();
    let e = load_err(&p);
    assert!(
        matches!(e, ModelError::Format { .. }) && e.to_string().contains("GGUF"),
        "{e}"
    );

    // empty file
    let p = dir.path().join("empty.gguf");
    std::fs::write(&p, b"").unwrap();
    assert!(matches!(load_err(&p), ModelError::Format { .. }));

    // wrong tensor shape
    let e = load_err(&write_gguf(&spec, &dir.path().join("short.gguf"), Damage::ShortQ));
    match &e {
        ModelError::BadShape {
            tensor, expected, got, ..
        } => {
            assert_eq!(tensor, "blk.0.attn_q.weight");
            assert_eq!(expected, &vec![64, 64]);
            assert_eq!(got, &vec![63, 64]);
        }
        other => panic!("expected BadShape, got {other}"),
    }

    // missing tensor
    let e = load_err(&write_gguf(
        &spec,
        &dir.path().join("missing.gguf"),
        Damage::MissingDown,
    ));
    assert!(
        matches!(&e, ModelError::MissingTensor { name, .. } if name == "blk.1.ffn_down.weight"),
        "{e}"
    );

    // unknown architecture
    let e = load_err(&write_gguf(&spec, &dir.path().join("arch.gguf"), Damage::UnknownArch));
    assert!(
        matches!(&e, ModelError::UnsupportedArch { arch, .. } if arch == "gpt5"),
        "{e}"
    );

    // no such file
    assert!(matches!(load_err(&dir.path().join("nope.gguf")), ModelError::Io { .. }));
}

#[test]
fn malformed_safetensors_dirs_give_errors() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec::new(TinyArch::Qwen2);
    let hf = write_hf_dir(&spec, &dir.path().join("hf"));
    // truncated weights file
    let st = hf.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    assert!(matches!(load_err(&hf), ModelError::Format { .. }));
    std::fs::write(&st, &bytes).unwrap();
    // unsupported architecture
    let cfg = std::fs::read_to_string(hf.join("config.json")).unwrap();
    std::fs::write(
        hf.join("config.json"),
        cfg.replace("Qwen2ForCausalLM", "MambaForCausalLM"),
    )
    .unwrap();
    assert!(matches!(load_err(&hf), ModelError::UnsupportedArch { .. }));
    // missing config
    std::fs::remove_file(hf.join("config.json")).unwrap();
    assert!(matches!(load_err(&hf), ModelError::Io { .. }));
}

#[test]
fn out_of_range_token_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let g = write_gguf(
        &TinySpec::new(TinyArch::Llama),
        &dir.path().join("t.gguf"),
        Damage::None,
    );
    let (model, _) = Model::load(&g, &LoadOptions::default()).unwrap();
    let mut kv = F16KvStore::new(model.kv_geometry(), 16);
    let e = model
        .forward_chunked(&[3, 64], &mut kv, 8, LogitsMode::Last)
        .unwrap_err();
    assert!(e.to_string().contains("token id 64"), "{e}");
    assert!(kv.is_empty(), "a rejected batch stores nothing");
    // In a batch the error names the sequence it belongs to, so a caller can end that one only.
    let (mut a, mut b) = (
        F16KvStore::new(model.kv_geometry(), 16),
        F16KvStore::new(model.kv_geometry(), 16),
    );
    let seqs = [
        pmkvq::model::SeqInput {
            tokens: &[3, 4],
            positions: &[0, 1],
        },
        pmkvq::model::SeqInput {
            tokens: &[5, 99],
            positions: &[0, 1],
        },
    ];
    let e = model
        .forward(&seqs, &mut [&mut a, &mut b], LogitsMode::Last)
        .unwrap_err();
    assert!(
        matches!(&e, ModelError::InSequence { index: 1, source } if source.to_string().contains("token id 99")),
        "{e}"
    );
    assert!(a.is_empty() && b.is_empty(), "a rejected batch stores nothing");
    // the context limit is enforced by the store, as an error
    let mut small = F16KvStore::new(model.kv_geometry(), 4);
    assert!(model
        .forward_chunked(&[1, 2, 3, 4, 5], &mut small, 8, LogitsMode::Last)
        .is_err());
}
