//! Scalar fused attention over packed rows: the specification the SIMD kernels are tested against.
//! A group reconstructs as `x̂ = code·S + mn`, so `q·x̂ = S·Σ q·code + mn·Σ q` and `Σ_t p_t x̂_t =
//! Σ_t (p_t S_t)·code_t + Σ_t p_t mn_t`: the dequantized values are never written out.

use crate::kvcache::quant::{unpack, PackedRows};

pub fn scores(rows: &PackedRows, head: usize, q: &[f32], scale: f32, t0: usize, out: &mut [f32]) {
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    let qsum: Vec<f32> = q.chunks_exact(g).map(|c| c.iter().sum()).collect();
    let mut codes = vec![0u16; g];
    for (t, o) in out.iter_mut().enumerate().take(rows.len().saturating_sub(t0)) {
        let mut s = 0.0f32;
        for k in 0..gph {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            unpack(bytes, rows.bits, &mut codes);
            let dot: f32 = q[k * g..(k + 1) * g]
                .iter()
                .zip(&codes)
                .map(|(a, &c)| a * c as f32)
                .sum();
            s += sc * dot + mn * qsum[k];
        }
        *o = s * scale;
    }
}

pub fn accumulate(rows: &PackedRows, head: usize, p: &[f32], t0: usize, acc: &mut [f32]) {
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    let mut codes = vec![0u16; g];
    for (t, &pt) in p.iter().enumerate().take(rows.len().saturating_sub(t0)) {
        for k in 0..gph {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            unpack(bytes, rows.bits, &mut codes);
            let w = pt * sc;
            let base = pt * mn;
            for (a, &c) in acc[k * g..(k + 1) * g].iter_mut().zip(&codes) {
                *a += w * c as f32 + base;
            }
        }
    }
}
