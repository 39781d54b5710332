//! Attention arithmetic shared by every KV store: scores → softmax → weighted sum of values.

/// Numerically stable softmax in place; returns nothing for an empty slice.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let sum = (crate::model::kernels::kernels().exp_sum)(scores, max);
    let inv = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// One query token's attention over one layer held as packed segments (sink, body, window — in that order) plus
/// the current token's own K/V unquantized, as `PmKvqStore::attend_and_store` computes it with the scalar kernels.
/// The specification the GPU decode-attention kernel is checked against. `q`: `q_heads·d`; returns `q_heads·d`.
pub fn decode_reference(
    g: super::KvGeometry,
    k: [&super::quant::PackedRows; 3],
    v: [&super::quant::PackedRows; 3],
    q: &[f32],
    cur: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    use super::quant::scalar;
    let d = g.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let stored: usize = k.iter().map(|s| s.len()).sum();
    let mut out = vec![0.0f32; g.q_dim()];
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        let kvh = h / g.group();
        let qv = &q[h * d..(h + 1) * d];
        let mut p = vec![0.0f32; stored + usize::from(cur.is_some())];
        let mut off = 0;
        for s in k {
            scalar::scores(s, kvh, qv, scale, &mut p[off..off + s.len()]);
            off += s.len();
        }
        if let Some((kc, _)) = cur {
            p[stored] = qv
                .iter()
                .zip(&kc[kvh * d..(kvh + 1) * d])
                .map(|(a, b)| a * b)
                .sum::<f32>()
                * scale;
        }
        softmax_in_place(&mut p);
        let mut off = 0;
        for s in v {
            scalar::accumulate(s, kvh, &p[off..off + s.len()], o);
            off += s.len();
        }
        if let Some((_, vc)) = cur {
            for (a, x) in o.iter_mut().zip(&vc[kvh * d..(kvh + 1) * d]) {
                *a += p[stored] * x;
            }
        }
    }
    out
}
