//! Attention arithmetic shared by every KV store: scores → softmax → weighted sum of values.
//! A store supplies the scores of its stored tokens and the value accumulation over them; the new tokens of the
//! call are always full precision and handled here.

use crate::model::kernels::kernels;

/// Numerically stable softmax in place; returns nothing for an empty slice.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    let inv = 1.0 / sum;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// Scores of query `q` against new (raw f32) keys `0..=upto` of KV head `kvh` (`k` is `n × kv_dim`).
pub fn raw_scores(q: &[f32], k: &[f32], kv_dim: usize, kvh: usize, d: usize, upto: usize, scale: f32, out: &mut [f32]) {
    let kern = kernels();
    for (j, o) in out.iter_mut().enumerate().take(upto + 1) {
        let kr = &k[j * kv_dim + kvh * d..j * kv_dim + (kvh + 1) * d];
        *o = (kern.dot_f32)(q, kr) * scale;
    }
}

/// `acc += Σ_j p[j] · v[j]` over new (raw f32) values `0..p.len()` of KV head `kvh`.
pub fn raw_accumulate(p: &[f32], v: &[f32], kv_dim: usize, kvh: usize, d: usize, acc: &mut [f32]) {
    for (j, &w) in p.iter().enumerate() {
        let vr = &v[j * kv_dim + kvh * d..j * kv_dim + (kvh + 1) * d];
        for (a, x) in acc.iter_mut().zip(vr) {
            *a += w * x;
        }
    }
}
