//! The calibration pipeline (spec §4–5, §5.6 order): sensitivity on the raw model with positional interpolation,
//! exact allocation, max-|K| statistics with PI, and the α search for key reparameterization.

use super::allocate::{allocate, shares, AllocError};
use super::capture::{expand_pair_scales, FakeQuantStore, KeyStatsStore};
use super::profile::{CalibSettings, Profile, PROFILE_VERSION};
use crate::kvcache::quant::{Bits, ShiftMode};
use crate::kvcache::{F32KvStore, KeyScaled, KvStore, Rotated, ROTATION_SEED};
use crate::model::{Model, ModelError, Tokenizer};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct CalibConfig {
    pub samples: usize,
    pub seq_len: usize,
    /// Positions are `t · (effective_len / seq_len)` in every pass (never at inference); equal to `seq_len`
    /// turns positional interpolation off.
    pub effective_len: usize,
    pub choices: Vec<u32>,
    pub avg_bits: f64,
    /// Width K/V are fake-quantized at in the α search (the reference README uses 4).
    pub alpha_bits: u32,
    pub data: Vec<PathBuf>,
    pub seed: u64,
    /// Calibrate the rotated method (`+rot`): K/V are rotated before they are fake-quantized in every
    /// measurement, and the α search may choose α = 0 (no key scaling) when rotation alone is better.
    pub rotate: bool,
    /// Measure the 2-bit width as the fitted floor the method as shipped stores ([`ShiftMode::Fitted`]) rather
    /// than the shifted one (`pmkvq calibrate --fit`; off by default: see the README's calibration section).
    pub fit: bool,
}

impl CalibConfig {
    /// How a measurement lowers K/V to the width it is measured at.
    pub fn shift(&self) -> ShiftMode {
        if self.fit {
            ShiftMode::Fitted
        } else {
            ShiftMode::Equivalent
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error("{0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("calibration data has {got} tokens, {samples} samples of {seq_len} need {need}")]
    NotEnoughData {
        got: usize,
        need: usize,
        samples: usize,
        seq_len: usize,
    },
    #[error("invalid setting: {0}")]
    Setting(String),
}

/// Stages reported to the progress callback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Reference,
    Sensitivity,
    AlphaSearch,
}

/// α grid: 1.00, 0.95, …, 0.05 (α = 0 is not tried, spec §5.4); with rotation also 0 (rotation alone).
pub fn alpha_grid(rotate: bool) -> Vec<f64> {
    let n = if rotate { 21 } else { 20 };
    (0..n).map(|n| 1.0 - n as f64 / 20.0).collect()
}

/// The measurement store: full precision with layer `l`'s K and/or V fake-quantized, rotated first if asked.
fn fake_quant(
    geom: crate::kvcache::KvGeometry,
    l: usize,
    k: Option<Bits>,
    v: Option<Bits>,
    max: usize,
    rotate: bool,
    shift: ShiftMode,
) -> Result<Box<dyn KvStore>, ModelError> {
    let mut bits = vec![(None, None); geom.layers];
    bits[l] = (k, v);
    let store: Box<dyn KvStore> = Box::new(FakeQuantStore::sides(geom, bits, max, shift));
    if rotate {
        Ok(Box::new(
            Rotated::rotate(store, ROTATION_SEED).map_err(ModelError::from)?,
        ))
    } else {
        Ok(store)
    }
}

/// Position ids with positional interpolation: `[0, s, 2s, …]`, `s = effective_len / seq_len`.
pub fn pi_positions(seq_len: usize, effective_len: usize) -> Vec<u32> {
    let s = (effective_len / seq_len).max(1) as u32;
    (0..seq_len as u32).map(|t| t * s).collect()
}

/// Calibration token sequences: each file is a document; documents are shuffled with `seed`, tokenized without
/// BOS, concatenated and cut into non-overlapping `seq_len` chunks (spec §8.2).
pub fn calibration_samples(tok: &Tokenizer, cfg: &CalibConfig) -> Result<Vec<Vec<u32>>, CalibError> {
    let mut docs = Vec::new();
    for f in &cfg.data {
        docs.push(std::fs::read_to_string(f).map_err(|e| CalibError::Io(f.clone(), e))?);
    }
    // Fisher–Yates with a fixed splitmix stream: the same files give the same samples everywhere
    let mut state = cfg.seed;
    for i in (1..docs.len()).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        docs.swap(i, ((z ^ (z >> 31)) % (i as u64 + 1)) as usize);
    }
    let need = cfg.samples * cfg.seq_len;
    let mut stream = Vec::with_capacity(need);
    for d in &docs {
        stream.extend(tok.encode(d, false)?);
        if stream.len() >= need {
            break;
        }
    }
    if stream.len() < need {
        return Err(CalibError::NotEnoughData {
            got: stream.len(),
            need,
            samples: cfg.samples,
            seq_len: cfg.seq_len,
        });
    }
    Ok(stream[..need].chunks_exact(cfg.seq_len).map(<[u32]>::to_vec).collect())
}

fn log_softmax_rows(logits: &[f32], vocab: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(vocab) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = (row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max) as f32;
        out.extend(row.iter().map(|&v| v - lse));
    }
    out
}

/// (mean KL(ref ‖ got), mean NLL of got) over the positions predicting tokens[1..].
fn compare(ref_lp: &[f32], logits: &[f32], tokens: &[u32], vocab: usize) -> (f64, f64) {
    let lp = log_softmax_rows(logits, vocab);
    let n = tokens.len() - 1;
    let (mut kl, mut nll) = (0.0f64, 0.0f64);
    for i in 0..n {
        let (r, g) = (&ref_lp[i * vocab..(i + 1) * vocab], &lp[i * vocab..(i + 1) * vocab]);
        kl += r
            .iter()
            .zip(g)
            .map(|(&a, &b)| {
                if a > -40.0 {
                    (a as f64).exp() * (a - b) as f64
                } else {
                    0.0
                }
            })
            .sum::<f64>();
        nll -= g[tokens[i + 1] as usize] as f64;
    }
    (kl / n as f64, nll / n as f64)
}

/// Run the whole pipeline. `progress(stage, done, total)` is called as work completes.
pub fn calibrate(
    model: &Model,
    tok: &Tokenizer,
    model_sha256: &str,
    cfg: &CalibConfig,
    progress: &mut dyn FnMut(Stage, usize, usize),
) -> Result<Profile, CalibError> {
    if cfg.seq_len < 2 || cfg.samples == 0 || cfg.effective_len < cfg.seq_len {
        return Err(CalibError::Setting(
            "need seq_len >= 2, samples >= 1 and effective_len >= seq_len".into(),
        ));
    }
    let choices: Vec<Bits> = cfg
        .choices
        .iter()
        .map(|&b| Bits::from_count(b).ok_or_else(|| CalibError::Setting(format!("choice {b} is not 2, 4, 8 or 16"))))
        .collect::<Result<_, _>>()?;
    let alpha_bits = Bits::from_count(cfg.alpha_bits)
        .ok_or_else(|| CalibError::Setting(format!("alpha bits {} is not 2, 4, 8 or 16", cfg.alpha_bits)))?;
    let c = &model.config;
    let (layers, vocab, geom) = (c.layers, c.vocab_size, model.kv_geometry());
    let samples = calibration_samples(tok, cfg)?;
    let pos = pi_positions(cfg.seq_len, cfg.effective_len);
    let max = cfg.seq_len + 1;

    // 1. reference pass per sample: layer inputs, reference log-probs, max-|K| per rotary pair (all with PI)
    let mut inputs = Vec::new();
    let mut ref_lp = Vec::new();
    let mut base_nll = 0.0;
    let mut stats = vec![vec![0.0f32; geom.kv_heads * geom.head_dim / 2]; layers];
    for (i, s) in samples.iter().enumerate() {
        let mut store = KeyStatsStore::new(geom, c.rope.layout, max).with_stats(stats);
        let xs = model.with_windows(&mut store, max, |kv| model.layer_inputs(s, &pos, kv))?;
        stats = std::mem::take(&mut store.tap.max_abs);
        let logits = model.with_windows(&mut F32KvStore::new(geom, max), max, |kv| {
            model.forward_from(layers, xs[layers].clone(), &pos, kv)
        })?;
        let lp = log_softmax_rows(&logits, vocab);
        base_nll += compare(&lp, &logits, s, vocab).1;
        ref_lp.push(lp);
        inputs.push(xs);
        progress(Stage::Reference, i + 1, samples.len());
    }
    base_nll /= samples.len() as f64;

    // 2. sensitivity: only layer ℓ's K, or only its V, quantized at b bits, the rest full precision (measured,
    // not Taylor), at the allocation's choices and every width the run-time plan can pick (8, 4, 2). The
    // joint K+V cost the allocation uses is their sum.
    let widths: Vec<Bits> = {
        let mut w = choices.clone();
        w.extend([Bits::B2, Bits::B4, Bits::B8]);
        w.retain(|b| *b != Bits::B16);
        w.sort();
        w.dedup();
        w
    };
    let mut sens_k = vec![vec![0.0f64; widths.len()]; layers];
    let mut sens_v = vec![vec![0.0f64; widths.len()]; layers];
    let mut sens_loss = vec![vec![0.0f64; widths.len()]; layers];
    let mut done = 0;
    // (a sliding-window layer keeps its window at f16 in every method: nothing of it is quantized to measure)
    let measured: Vec<usize> = (0..layers).filter(|&l| !c.is_local(l)).collect();
    let total = measured.len() * widths.len() * samples.len() * 2;
    for &l in &measured {
        for (wi, &b) in widths.iter().enumerate() {
            for (si, s) in samples.iter().enumerate() {
                for side in 0..2 {
                    let (k, v) = if side == 0 { (Some(b), None) } else { (None, Some(b)) };
                    let mut store = fake_quant(geom, l, k, v, max, cfg.rotate, cfg.shift())?;
                    let logits = model.with_windows(store.as_mut(), max, |kv| {
                        model.forward_from(l, inputs[si][l].clone(), &pos, kv)
                    })?;
                    let (kl, nll) = compare(&ref_lp[si], &logits, s, vocab);
                    let table = if side == 0 { &mut sens_k } else { &mut sens_v };
                    table[l][wi] += kl / samples.len() as f64;
                    sens_loss[l][wi] += (nll - base_nll) / samples.len() as f64;
                    done += 1;
                    progress(Stage::Sensitivity, done, total);
                }
            }
        }
    }
    let sens_kl: Vec<Vec<f64>> = sens_k
        .iter()
        .zip(&sens_v)
        .map(|(k, v)| k.iter().zip(v).map(|(a, b)| a + b).collect())
        .collect();

    // 3. allocation on the measured KL (always ≥ 0 and less noisy than the loss difference)
    let choice_idx: Vec<usize> = choices
        .iter()
        .map(|b| widths.iter().position(|w| w == b).unwrap_or(0))
        .collect();
    let sens_for_choices: Vec<Vec<f64>> = sens_kl
        .iter()
        .map(|row| choice_idx.iter().map(|&i| row[i]).collect())
        .collect();
    let budget_bits = (cfg.avg_bits * layers as f64).floor() as u64;
    let bits = allocate(&sens_for_choices, &cfg.choices, budget_bits)?;

    // 4. α search per layer: attention output MSE with K/V at `alpha_bits` against the full-precision layer
    let grid = alpha_grid(cfg.rotate);
    let mut alpha = vec![1.0f64; layers];
    let mut key_scales = vec![vec![1.0f32; geom.kv_heads * geom.head_dim / 2]; layers];
    for l in 0..layers {
        if c.is_local(l) {
            progress(Stage::AlphaSearch, l + 1, layers);
            continue;
        }
        let teacher: Vec<Vec<f32>> = inputs
            .iter()
            .map(|xs| {
                model.with_windows(&mut F32KvStore::new(geom, max), max, |kv| {
                    model.attention_block(l, &xs[l], &pos, kv)
                })
            })
            .collect::<Result<_, _>>()?;
        let mut best = (f64::INFINITY, 1.0f64, vec![]);
        for &a in &grid {
            let pair: Vec<f32> = stats[l]
                .iter()
                .map(|&m| (m.max(1e-30) as f64).powf(a).clamp(1e-4, 1e4) as f32)
                .collect();
            let mut per_layer = vec![vec![1.0f32; geom.kv_dim()]; layers];
            per_layer[l] = expand_pair_scales(&pair, geom.kv_heads, geom.head_dim, c.rope.layout);
            let scales = Arc::new(per_layer);
            let mut loss = 0.0;
            for (si, xs) in inputs.iter().enumerate() {
                let inner = fake_quant(
                    geom,
                    l,
                    Some(alpha_bits),
                    Some(alpha_bits),
                    max,
                    cfg.rotate,
                    cfg.shift(),
                )?;
                let mut store = KeyScaled::new(inner, scales.clone(), "").map_err(ModelError::from)?;
                let out = model.with_windows(&mut store, max, |kv| model.attention_block(l, &xs[l], &pos, kv))?;
                loss += out
                    .iter()
                    .zip(&teacher[si])
                    .map(|(a, b)| ((a - b) as f64).powi(2))
                    .sum::<f64>()
                    / out.len() as f64;
            }
            // strictly better only: ties keep the larger α (the grid runs from 1.0 down)
            if loss < best.0 {
                best = (loss, a, pair);
            }
        }
        alpha[l] = best.1;
        key_scales[l] = best.2;
        progress(Stage::AlphaSearch, l + 1, layers);
    }

    Ok(Profile {
        version: PROFILE_VERSION,
        model_sha256: model_sha256.to_string(),
        model_file: model
            .source
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        arch: c.arch,
        layers,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        d_kv: c.kv_dim(),
        rope_layout: c.rope.layout,
        settings: CalibSettings {
            samples: cfg.samples,
            seq_len: cfg.seq_len,
            effective_len: cfg.effective_len,
            pi_stride: (cfg.effective_len / cfg.seq_len).max(1),
            choices: cfg.choices.clone(),
            avg_bits: cfg.avg_bits,
            alpha_bits: cfg.alpha_bits,
            data: cfg.data.iter().map(|p| p.display().to_string()).collect(),
            seed: cfg.seed,
            fit: cfg.fit,
        },
        widths: widths.iter().map(|b| b.count()).collect(),
        sensitivity_kl: sens_kl,
        sensitivity_loss: sens_loss,
        shares: shares(&bits),
        bits,
        alpha,
        key_scales,
        rotated: cfg.rotate,
        sensitivity_k: sens_k,
        sensitivity_v: sens_v,
    })
}
