//! Calibration: key reparameterization is exact without quantization on both RoPE layouts, scales are shared
//! within rotary pairs, and the pipeline runs end to end into a profile bound to its model.

mod common;

use common::tiny::{write_gguf, Damage, TinyArch, TinySpec};
use pmkvq::calib::capture::{expand_pair_scales, rotary_pairs};
use pmkvq::calib::run::pi_positions;
use pmkvq::calib::{calibrate, CalibConfig, Profile};
use pmkvq::kvcache::{F32KvStore, KeyScaled, KvStore};
use pmkvq::model::{LoadOptions, LogitsMode, Model, RopeLayout};

// Applied after RoPE to Q and K alike, any diagonal scaling leaves q·k unchanged; sharing one scale per rotary
// pair is what also lets the same scales be folded into f16/f32 q/k weights *before* RoPE (spec §5.3).
use std::sync::Arc;

fn logits_with(model: &Model, store: &mut dyn KvStore, tokens: &[u32]) -> Vec<f32> {
    model.forward_chunked(tokens, store, 4, LogitsMode::All).unwrap()
}

fn random_pair_scales(layers: usize, kv_heads: usize, d: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut s = seed;
    (0..layers)
        .map(|_| {
            (0..kv_heads * d / 2)
                .map(|_| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                    0.2 + 4.0 * ((s >> 40) as f32 / (1u64 << 24) as f32)
                })
                .collect()
        })
        .collect()
}

#[test]
fn reparameterization_is_exact_without_quantization_on_both_rope_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let tokens: Vec<u32> = (0..11).map(|i| (i * 5 + 3) % 64).collect();
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let path = write_gguf(
            &TinySpec::new(arch),
            &dir.path().join(format!("{arch:?}.gguf")),
            Damage::None,
        );
        let (model, _) = Model::load(&path, &LoadOptions { threads: 1 }).unwrap();
        let (g, layout) = (model.kv_geometry(), model.config.rope.layout);
        assert_eq!(
            layout,
            if arch == TinyArch::Llama {
                RopeLayout::Interleaved
            } else {
                RopeLayout::Neox
            }
        );
        let plain = logits_with(&model, &mut F32KvStore::new(g, 64), &tokens);
        let pairs = random_pair_scales(g.layers, g.kv_heads, g.head_dim, 7);
        let scales = Arc::new(
            pairs
                .iter()
                .map(|p| expand_pair_scales(p, g.kv_heads, g.head_dim, layout))
                .collect(),
        );
        let mut scaled_store = KeyScaled::new(Box::new(F32KvStore::new(g, 64)), scales, "+rep").unwrap();
        let scaled = logits_with(&model, &mut scaled_store, &tokens);
        let norm = plain.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (a, b) in plain.iter().zip(&scaled) {
            assert!((a - b).abs() <= 1e-4 * norm, "{arch:?}: {a} vs {b}");
        }
    }
}

#[test]
fn pair_scales_are_equal_on_both_channels_of_every_rotary_pair() {
    for layout in [RopeLayout::Interleaved, RopeLayout::Neox] {
        let pairs = random_pair_scales(1, 3, 64, 3).remove(0);
        let full = expand_pair_scales(&pairs, 3, 64, layout);
        for h in 0..3 {
            for (j, (a, b)) in rotary_pairs(layout, 64).into_iter().enumerate() {
                assert_eq!(full[h * 64 + a], full[h * 64 + b]);
                assert_eq!(full[h * 64 + a], pairs[h * 32 + j]);
            }
        }
    }
    assert_eq!(pi_positions(2048, 8192)[..4], [0, 4, 8, 12]);
    assert_eq!(*pi_positions(2048, 8192).last().unwrap(), 8188);
}

#[test]
fn calibration_runs_end_to_end_and_the_profile_is_bound_to_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok, cfg) = tiny_calibration(dir.path(), TinyArch::Qwen2, false, false);
    let mut ticks = 0;
    let p = calibrate(&model, &tok, "abc123", &cfg, &mut |_, _, _| ticks += 1).unwrap();
    assert!(ticks > 0);
    let g = model.kv_geometry();
    assert_eq!(
        p.bits.iter().map(|&b| b as u64).sum::<u64>(),
        6,
        "2 layers at an average of 3 bits"
    );
    assert!((p.shares.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(p.alpha.iter().all(|a| (0.05..=1.0).contains(a)));
    assert_eq!(p.settings.pi_stride, 4);
    // sensitivity falls with width
    for row in &p.sensitivity_kl {
        assert!(row[0] >= row[1], "{row:?}");
    }
    // scales: max|K|^α per pair, shared by the pair
    for l in &p.key_scales {
        assert_eq!(l.len(), g.kv_heads * g.head_dim / 2);
        assert!(l.iter().all(|s| *s > 0.0));
    }
    let file = dir.path().join("p.json");
    p.save(&file).unwrap();
    let back = Profile::load(&file).unwrap();
    assert_eq!(back, p);
    back.check(&model, "abc123", &file).unwrap();
    let e = back.check(&model, "other", &file).unwrap_err().to_string();
    assert!(e.contains("another model"), "{e}");
    std::fs::write(&file, "{\"version\": 1}").unwrap();
    assert!(Profile::load(&file).is_err());
    // K and V are measured apart at every width the run-time plan picks; the joint table is their sum
    assert_eq!(p.widths, vec![2, 4, 8]);
    assert!(!p.rotated);
    for l in 0..p.layers {
        for w in 0..3 {
            let sum = p.sensitivity_k[l][w] + p.sensitivity_v[l][w];
            assert!((p.sensitivity_kl[l][w] - sum).abs() < 1e-12);
        }
    }
    let sens = p.sensitivity();
    for row in sens.k.iter().chain(&sens.v) {
        assert_eq!(row[0], 0.0, "16 bits cost nothing");
        assert!(
            row.windows(2).all(|w| w[0] <= w[1]),
            "costs never fall as bits fall: {row:?}"
        );
    }
    // A version 1 profile (joint K+V sensitivity at the allocation's widths only) still loads: each side gets
    // half, 8 bits is estimated from 4.
    let mut v1 = serde_json::to_value(&p).unwrap();
    let o = v1.as_object_mut().unwrap();
    o.insert("version".into(), 1.into());
    for k in ["rotated", "sensitivity_k", "sensitivity_v"] {
        o.remove(k);
    }
    o.insert("widths".into(), serde_json::json!([2, 4]));
    let joint: Vec<Vec<f64>> = p.sensitivity_kl.iter().map(|r| r[..2].to_vec()).collect();
    o.insert("sensitivity_kl".into(), serde_json::to_value(&joint).unwrap());
    o.insert("sensitivity_loss".into(), serde_json::to_value(&joint).unwrap());
    std::fs::write(&file, serde_json::to_string(&v1).unwrap()).unwrap();
    let old = Profile::load(&file).expect("a version 1 profile loads");
    let s1 = old.sensitivity();
    assert_eq!(s1.k.len(), old.layers);
    for ((k, v), j) in s1.k.iter().zip(&s1.v).zip(&joint) {
        assert_eq!(k, v);
        assert!((k[3] - j[0] / 2.0).abs() < 1e-12, "2 bits: half the joint cost");
        assert!((k[1] - k[2] / 16.0).abs() < 1e-12, "8 bits estimated from 4");
    }
}

#[test]
fn calibration_measures_the_two_bit_width_as_the_fitted_floor_the_store_holds() {
    let dir = tempfile::tempdir().unwrap();
    let (model, tok, cfg) = tiny_calibration(dir.path(), TinyArch::Llama, true, false);
    let run = |fit: bool| {
        calibrate(
            &model,
            &tok,
            "abc",
            &CalibConfig { fit, ..cfg.clone() },
            &mut |_, _, _| {},
        )
        .unwrap()
    };
    let (shifted, fitted) = (run(false), run(true));
    assert!(fitted.settings.fit && !shifted.settings.fit);
    // 4 and 8 bits are the same ERS path under both: identical measurements, and the α search (at 4 bits) agrees
    for l in 0..fitted.layers {
        for w in 1..3 {
            assert_eq!(
                fitted.sensitivity_k[l][w], shifted.sensitivity_k[l][w],
                "layer {l} width {w}"
            );
            assert_eq!(
                fitted.sensitivity_v[l][w], shifted.sensitivity_v[l][w],
                "layer {l} width {w}"
            );
        }
    }
    assert_eq!(fitted.alpha, shifted.alpha);
    // 2 bits differs: the measurement went through the fit
    let two = |p: &Profile| {
        p.sensitivity_k
            .iter()
            .chain(&p.sensitivity_v)
            .map(|r| r[0])
            .collect::<Vec<_>>()
    };
    assert_ne!(two(&fitted), two(&shifted));
    eprintln!(
        "2-bit sensitivity: fitted {:?}, shifted {:?}",
        two(&fitted),
        two(&shifted)
    );
    // an older profile without the flag loads as measured shifted
    let mut v = serde_json::to_value(&fitted).unwrap();
    v["settings"].as_object_mut().unwrap().remove("fit");
    let file = dir.path().join("old.json");
    std::fs::write(&file, serde_json::to_string(&v).unwrap()).unwrap();
    assert!(!Profile::load(&file).unwrap().settings.fit);
}

/// A tiny random-weight model of `arch` in `dir`, its tokenizer, and a small calibration over repeated text.
fn tiny_calibration(
    dir: &std::path::Path,
    arch: TinyArch,
    rotate: bool,
    fit: bool,
) -> (Model, pmkvq::model::Tokenizer, CalibConfig) {
    let path = write_gguf(&TinySpec::new(arch), &dir.join("tiny.gguf"), Damage::None);
    let (model, tok) = Model::load(&path, &LoadOptions { threads: 1 }).unwrap();
    let data = dir.join("calib.txt");
    std::fs::write(&data, "abc def ghi jkl ".repeat(200)).unwrap();
    let cfg = CalibConfig {
        samples: 2,
        seq_len: 32,
        effective_len: 128,
        choices: vec![2, 4],
        avg_bits: 3.0,
        alpha_bits: 4,
        data: vec![data],
        seed: 1,
        rotate,
        fit,
    };
    (model, tok, cfg)
}
