//! Teacher-forced divergence from a reference cache (KL, top-1 agreement, perplexity) and greedy agreement. The
//! reference is the f16 cache (llama.cpp's default, what the tables compare with) or the exact f32 one.

use crate::engine::sampler::argmax;
use crate::kvcache::{KvError, KvMethod, KvStore, MethodSpec};
use crate::model::{Backend, LogitsMode, ModelError};
use serde::Serialize;

#[derive(Clone, Debug)]
pub struct DivergenceConfig {
    pub methods: Vec<MethodSpec>,
    /// The cache every method is compared with: [`KvMethod::Fp16`] (the default) or [`KvMethod::F32`].
    pub reference: KvMethod,
    /// Tokens before this index are context only (not scored).
    pub score_from: usize,
    /// Tokens fed per forward pass after the context (1 = exactly a decode step).
    pub step: usize,
    /// Tokens of free-running greedy generation compared with the reference's (0 = skip).
    pub greedy_tokens: usize,
    pub prefill_chunk: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub method: String,
    pub budget: Option<usize>,
    pub mean_kl: f64,
    pub p99_kl: f64,
    pub top1_agreement: f64,
    /// Scored positions where the reference's own top two log-probs are within [`NEAR_TIE`] nats.
    pub near_ties: usize,
    /// Top-1 disagreements with the reference, and how many of them fall on its near-ties.
    pub flips: usize,
    pub near_tie_flips: usize,
    pub ppl: f64,
    /// Peak true bytes over the run.
    pub true_bytes: usize,
    pub payload_bytes: usize,
    /// True bits per stored K/V element at the end of the run (all tokens stored).
    pub bits_per_element: f64,
    pub within_budget: bool,
    /// Each layer's K and V body widths at the end of the run.
    pub final_kv_bits: Vec<[u32; 2]>,
    /// Tokens scored before the method stopped (a budget can end a run early).
    pub scored_tokens: usize,
    /// Why the run stopped early, if it did.
    pub stopped: Option<String>,
    /// First index where free-running greedy output differs from the reference's (None: never, in the window).
    pub greedy_first_divergence: Option<usize>,
    /// KL per scored position (for plots; omitted from JSON output by the CLI unless asked).
    #[serde(skip)]
    pub kl_trace: Vec<f64>,
    /// Per step: (tokens stored, bits of each layer) for adaptive methods.
    #[serde(skip)]
    pub bits_trace: Vec<(usize, Vec<u32>)>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DivergenceReport {
    /// The reference cache's name (`fp16` or `f32`).
    pub reference: String,
    pub tokens: usize,
    pub scored_from: usize,
    /// True bytes of the f16 cache holding the whole sequence.
    pub fp16_bytes: usize,
    pub methods: Vec<MethodResult>,
}

/// A margin between the reference's top two log-probs below which its own choice is a near-tie: the golden
/// files' bound for comparing greedy tokens (a decision this close moves with any rounding of the cache).
pub const NEAR_TIE: f64 = 0.1;

struct Run {
    spec: MethodSpec,
    store: Box<dyn KvStore>,
    kls: Vec<f64>,
    agree: usize,
    near_ties: usize,
    near_tie_flips: usize,
    nll: f64,
    peak_true: usize,
    peak_payload: usize,
    stopped: Option<String>,
    bits_trace: Vec<(usize, Vec<u32>)>,
}

pub(crate) fn log_softmax(l: &[f32]) -> Vec<f64> {
    let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = l.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln() + max;
    l.iter().map(|&v| v as f64 - lse).collect()
}

/// The gap between the two largest log-probs.
fn top2_margin(lp: &[f64]) -> f64 {
    let (mut a, mut b) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &x in lp {
        if x > a {
            (a, b) = (x, a);
        } else if x > b {
            b = x;
        }
    }
    a - b
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

/// The reference cache's spec: only the unquantized caches (fp16, f32) can be one.
pub fn reference_spec(m: &KvMethod) -> Result<MethodSpec, ModelError> {
    match m {
        KvMethod::Fp16 | KvMethod::F32 => Ok(MethodSpec::plain(m.clone(), None, &m.to_string())),
        other => Err(ModelError::Input(format!(
            "reference: must be fp16 or f32 (an unquantized cache), got {other}"
        ))),
    }
}

/// Run every method over `tokens` in lockstep with the reference cache.
pub fn run_divergence(
    model: &dyn Backend,
    tokens: &[u32],
    cfg: &DivergenceConfig,
) -> Result<DivergenceReport, ModelError> {
    let geom = model.kv_geometry();
    let max = tokens.len() + cfg.greedy_tokens + 8;
    let reference_spec = reference_spec(&cfg.reference)?;
    let mut reference = model.new_store(&reference_spec, geom, max)?;
    let mut runs: Vec<Run> = Vec::new();
    for m in &cfg.methods {
        let store = model.new_store(m, model.kv_geometry(), max)?;
        runs.push(Run {
            spec: m.clone(),
            store,
            kls: Vec::new(),
            agree: 0,
            near_ties: 0,
            near_tie_flips: 0,
            nll: 0.0,
            peak_true: 0,
            peak_payload: 0,
            stopped: None,
            bits_trace: Vec::new(),
        });
    }
    let ctx = cfg.score_from.clamp(1, tokens.len());
    // Position p predicts token p+1 from the logits of feeding token p: prefill tokens[..ctx-1] as context, then
    // step from position ctx-1 so that the first scored prediction is of token ctx.
    let context = &tokens[..ctx - 1];
    if !context.is_empty() {
        model.forward_chunked(context, reference.as_mut(), cfg.prefill_chunk, LogitsMode::None)?;
        for r in runs.iter_mut() {
            if let Err(e) = model.forward_chunked(context, r.store.as_mut(), cfg.prefill_chunk, LogitsMode::None) {
                r.stopped = Some(e.to_string());
            }
        }
    }
    let vocab = model.config().vocab_size;
    let mut pos = ctx - 1;
    while pos + 1 < tokens.len() {
        let end = (pos + cfg.step.max(1)).min(tokens.len() - 1);
        let chunk = &tokens[pos..end];
        let positions: Vec<u32> = (pos as u32..end as u32).collect();
        let ref_logits = model.forward_one(chunk, &positions, reference.as_mut(), LogitsMode::All)?;
        let ref_lp: Vec<Vec<f64>> = ref_logits.chunks_exact(vocab).map(log_softmax).collect();
        let ref_tie: Vec<bool> = ref_lp.iter().map(|lp| top2_margin(lp) < NEAR_TIE).collect();
        for r in runs.iter_mut().filter(|r| r.stopped.is_none()) {
            let logits = match model.forward_one(chunk, &positions, r.store.as_mut(), LogitsMode::All) {
                Ok(l) => l,
                Err(ModelError::Kv(e @ KvError::OutOfBudget { .. })) => {
                    r.stopped = Some(format!("at {} tokens: {e}", r.store.len(0)));
                    continue;
                }
                Err(e) => return Err(e),
            };
            for (i, (row, rp)) in logits.chunks_exact(vocab).zip(&ref_lp).enumerate() {
                let lp = log_softmax(row);
                let kl: f64 = rp
                    .iter()
                    .zip(&lp)
                    .map(|(a, b)| if *a > -50.0 { a.exp() * (a - b) } else { 0.0 })
                    .sum();
                r.kls.push(kl.max(0.0));
                let want = tokens[pos + i + 1] as usize;
                r.nll -= lp[want];
                r.near_ties += ref_tie[i] as usize;
                if argmax(row) == argmax(&ref_logits[i * vocab..(i + 1) * vocab]) {
                    r.agree += 1;
                } else {
                    r.near_tie_flips += ref_tie[i] as usize;
                }
            }
            let (tb, pb) = (r.store.true_bytes(), r.store.payload_bytes());
            r.peak_true = r.peak_true.max(tb);
            r.peak_payload = r.peak_payload.max(pb);
            if matches!(r.spec.method, KvMethod::Pmkvq(_)) {
                let bits = r.store.layer_bits();
                if r.bits_trace.last().is_none_or(|(_, b)| *b != bits) {
                    r.bits_trace.push((r.store.len(0), bits));
                }
            }
        }
        pos = end;
    }
    let elems_per_token = (2 * geom.layers * geom.kv_dim()) as f64;
    // what the f16 cache holds for the whole sequence (sliding-window layers keep their window), whichever cache
    // is the reference: the f32 one holds the same values at twice the bytes
    let fp16_bytes = match cfg.reference {
        KvMethod::F32 => reference.true_bytes() / 2,
        _ => reference.true_bytes(),
    };
    let mut methods = Vec::new();
    for r in runs {
        let n = r.kls.len().max(1) as f64;
        let greedy = if cfg.greedy_tokens > 0 && r.stopped.is_none() {
            greedy_divergence(model, tokens, ctx, &r.spec, cfg)?
        } else {
            None
        };
        methods.push(MethodResult {
            method: r.spec.label.clone(),
            budget: r.spec.budget,
            mean_kl: r.kls.iter().sum::<f64>() / n,
            p99_kl: percentile(&r.kls, 0.99),
            top1_agreement: r.agree as f64 / n,
            near_ties: r.near_ties,
            flips: r.kls.len() - r.agree,
            near_tie_flips: r.near_tie_flips,
            ppl: (r.nll / n).exp(),
            true_bytes: r.peak_true,
            payload_bytes: r.peak_payload,
            bits_per_element: r.store.true_bytes() as f64 * 8.0 / (elems_per_token * r.store.len(0).max(1) as f64),
            within_budget: r.spec.budget.is_none_or(|b| r.peak_true <= b),
            final_kv_bits: r.store.layer_kv_bits(),
            scored_tokens: r.kls.len(),
            stopped: r.stopped,
            greedy_first_divergence: greedy,
            kl_trace: r.kls,
            bits_trace: r.bits_trace,
        });
    }
    Ok(DivergenceReport {
        reference: reference_spec.label,
        tokens: tokens.len(),
        scored_from: ctx,
        fp16_bytes,
        methods,
    })
}

/// Greedy generation from the context with `method` and with the reference cache: the first index where they
/// differ.
fn greedy_divergence(
    model: &dyn Backend,
    tokens: &[u32],
    ctx: usize,
    spec: &MethodSpec,
    cfg: &DivergenceConfig,
) -> Result<Option<usize>, ModelError> {
    let geom = model.kv_geometry();
    let n = cfg.greedy_tokens;
    let run = |store: &mut dyn KvStore| -> Result<Vec<u32>, ModelError> {
        let mut logits = model.forward_chunked(&tokens[..ctx], store, cfg.prefill_chunk, LogitsMode::Last)?;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = argmax(&logits);
            out.push(t);
            let pos = [store.len(0) as u32];
            match model.forward_one(&[t], &pos, store, LogitsMode::Last) {
                Ok(l) => logits = l,
                Err(ModelError::Kv(_)) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    };
    let mut f = model.new_store(&reference_spec(&cfg.reference)?, geom, ctx + n + 8)?;
    let reference = run(f.as_mut())?;
    let mut s = model.new_store(spec, model.kv_geometry(), ctx + n + 8)?;
    let ours = run(s.as_mut())?;
    Ok(ours
        .iter()
        .zip(&reference)
        .position(|(a, b)| a != b)
        .or((ours.len() < reference.len()).then_some(ours.len())))
}

impl DivergenceReport {
    /// Combine reports over several chunks of text (llama-perplexity style): statistics over all scored tokens.
    pub fn merge(parts: Vec<DivergenceReport>) -> Option<DivergenceReport> {
        let first = parts.first()?.clone();
        let mut out = DivergenceReport {
            tokens: 0,
            fp16_bytes: 0,
            ..first
        };
        let mut acc: Vec<(MethodResult, f64, f64)> = Vec::new(); // (merged, Σ agree, Σ nll)
        for p in parts {
            out.tokens += p.tokens;
            out.fp16_bytes = out.fp16_bytes.max(p.fp16_bytes);
            for (i, m) in p.methods.into_iter().enumerate() {
                let n = m.scored_tokens as f64;
                let (agree, nll) = (m.top1_agreement * n, m.ppl.ln() * n);
                if acc.len() <= i {
                    acc.push((
                        MethodResult {
                            kl_trace: Vec::new(),
                            scored_tokens: 0,
                            near_ties: 0,
                            flips: 0,
                            near_tie_flips: 0,
                            ..m.clone()
                        },
                        0.0,
                        0.0,
                    ));
                }
                let a = &mut acc[i];
                a.0.kl_trace.extend(&m.kl_trace);
                a.0.scored_tokens += m.scored_tokens;
                a.0.near_ties += m.near_ties;
                a.0.flips += m.flips;
                a.0.near_tie_flips += m.near_tie_flips;
                a.0.true_bytes = a.0.true_bytes.max(m.true_bytes);
                a.0.payload_bytes = a.0.payload_bytes.max(m.payload_bytes);
                a.0.bits_per_element = a.0.bits_per_element.max(m.bits_per_element);
                a.0.within_budget &= m.within_budget;
                a.0.stopped = a.0.stopped.take().or(m.stopped);
                a.0.greedy_first_divergence = match (a.0.greedy_first_divergence, m.greedy_first_divergence) {
                    (Some(x), Some(y)) => Some(x.min(y)),
                    (x, y) => x.or(y),
                };
                a.1 += agree;
                a.2 += nll;
            }
        }
        out.methods = acc
            .into_iter()
            .map(|(mut m, agree, nll)| {
                let n = m.scored_tokens.max(1) as f64;
                m.mean_kl = m.kl_trace.iter().sum::<f64>() / n;
                m.p99_kl = percentile(&m.kl_trace, 0.99);
                m.top1_agreement = agree / n;
                m.ppl = (nll / n).exp();
                m
            })
            .collect();
        Some(out)
    }
}

/// A long sequence the model writes itself from `prompt` (a reasoning trace): sampled at the paper's settings
/// (temperature 0.6, top-p 0.95) with end-of-sequence tokens suppressed, so it reaches `total` tokens.
pub fn generate_trace(
    model: &dyn Backend,
    tok: &crate::model::Tokenizer,
    prompt: &[u32],
    total: usize,
    seed: u64,
) -> Result<Vec<u32>, ModelError> {
    let params = crate::engine::SamplingParams {
        temperature: 0.6,
        top_p: 0.95,
        seed,
        ..Default::default()
    };
    let mut sampler = crate::engine::Sampler::new(params).map_err(|e| ModelError::Input(e.to_string()))?;
    let mut store = model.new_store(
        &MethodSpec::plain(KvMethod::Fp16, None, "fp16"),
        model.kv_geometry(),
        total + 1,
    )?;
    let mut logits = model.forward_chunked(prompt, store.as_mut(), 512, LogitsMode::Last)?;
    let mut seq = prompt.to_vec();
    while seq.len() < total {
        for &e in &tok.eos {
            if let Some(l) = logits.get_mut(e as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        let t = sampler.sample(&mut logits, &seq);
        seq.push(t);
        let pos = [(seq.len() - 1) as u32];
        logits = model.forward_one(&[t], &pos, store.as_mut(), LogitsMode::Last)?;
    }
    Ok(seq)
}

#[cfg(test)]
mod tests {
    use super::top2_margin;

    #[test]
    fn the_margin_is_between_the_two_largest_wherever_they_are() {
        assert_eq!(top2_margin(&[-3.0, -0.5, -2.0, -0.75]), 0.25);
        assert_eq!(top2_margin(&[-0.5, -0.75, -3.0]), 0.25);
        assert_eq!(top2_margin(&[-2.0, -1.0, -1.0]), 0.0);
    }
}
