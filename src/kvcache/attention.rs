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
