//! Attention over stored K/V: the fused kernels over packed codes (scalar = the specification, AVX2, NEON, chosen
//! once per process), the softmax every store shares, and [`attend_segments`], the one per-head loop over a
//! layer's segments (sink | body | window) plus the call's own tokens unquantized (spec §3.3). The PM-KVQ store
//! and the GPU kernel's CPU reference ([`decode_reference`]) both run it.
//!
//! A group reconstructs as `x̂ = code·S + mn`, so the kernels compute `q·x̂ = S·Σ q·code + mn·Σ q` and
//! `Σ_t p_t x̂_t = Σ_t (p_t S_t)·code_t + Σ_t p_t mn_t` without writing dequantized values out.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_f16;
pub mod group;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod scalar;

use super::quant::PackedRows;
use super::KvGeometry;

/// Fused attention kernels over packed rows, chosen once per process.
pub struct AttnKernels {
    pub name: &'static str,
    /// `out[t] = scale · Σ_c q[c]·x̂[t0+t][c]` for the first `min(out.len(), rows.len() − t0)` tokens of `rows`
    /// from `t0` on, head `head`.
    pub scores: fn(&PackedRows, usize, &[f32], f32, usize, &mut [f32]),
    /// `acc[c] += Σ_t p[t]·x̂[t0+t][c]` for the first `min(p.len(), rows.len() − t0)` tokens of `rows` from `t0`
    /// on, head `head`.
    pub accumulate: fn(&PackedRows, usize, &[f32], usize, &mut [f32]),
}

pub static SCALAR: AttnKernels = AttnKernels {
    name: "scalar",
    scores: scalar::scores,
    accumulate: scalar::accumulate,
};

/// The attention kernels for this CPU, detected on first use.
pub fn attn_kernels() -> &'static AttnKernels {
    static CHOSEN: std::sync::OnceLock<&'static AttnKernels> = std::sync::OnceLock::new();
    crate::cpu::detect(
        &CHOSEN,
        &[
            #[cfg(target_arch = "x86_64")]
            (avx2::supported, &avx2::AVX2),
            #[cfg(target_arch = "aarch64")]
            (neon::supported, &neon::NEON),
        ],
        &SCALAR,
    )
}

/// Numerically stable softmax in place; returns nothing for an empty slice.
pub fn softmax_in_place(scores: &mut [f32]) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return;
    }
    let sum = (crate::cpu::kernels().exp_sum)(scores, max);
    let inv = (1.0 / sum) as f32;
    for s in scores.iter_mut() {
        *s *= inv;
    }
}

/// The tokens of the current call, attended to unquantized after the stored ones (spec §3.3).
#[derive(Clone, Copy)]
pub struct Fresh<'a> {
    /// Keys and values, token-major, `stride` values per token (`kv_heads·head_dim`).
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub stride: usize,
    /// How many of them the query sees (causal: `i + 1` for the call's `i`-th token).
    pub count: usize,
}

/// The arithmetic one attention call runs on: the packed-code kernels and the f32 dot product for fresh tokens.
#[derive(Clone, Copy)]
pub struct AttnOps {
    pub packed: &'static AttnKernels,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
}

impl AttnOps {
    /// This CPU's fastest kernels.
    pub fn detected() -> Self {
        AttnOps {
            packed: attn_kernels(),
            dot_f32: crate::cpu::kernels().dot_f32,
        }
    }
    /// The scalar specification.
    pub fn scalar() -> Self {
        AttnOps {
            packed: &SCALAR,
            dot_f32: crate::cpu::SCALAR.dot_f32,
        }
    }
}

/// One query head's attention: scores over the first `visible` stored tokens of `k`'s segments (in order), then
/// over `fresh`'s tokens unquantized; softmax; the weighted sum of the matching values into `out` (`head_dim`
/// values, overwritten). `q`: this head's query (`head_dim`); `kv_head`: the KV head it reads.
#[allow(clippy::too_many_arguments)]
pub fn attend_segments(
    ops: AttnOps,
    k: &[&PackedRows],
    v: &[&PackedRows],
    visible: usize,
    fresh: Option<Fresh<'_>>,
    kv_head: usize,
    q: &[f32],
    scale: f32,
    out: &mut [f32],
) {
    let d = q.len();
    let fresh_count = fresh.map_or(0, |f| f.count);
    let mut p = vec![0.0f32; visible + fresh_count];
    let mut off = 0;
    for seg in k {
        let take = seg.len().min(visible - off);
        (ops.packed.scores)(seg, kv_head, q, scale, 0, &mut p[off..off + take]);
        off += take;
    }
    if let Some(f) = fresh {
        for j in 0..f.count {
            let kj = &f.k[j * f.stride + kv_head * d..j * f.stride + (kv_head + 1) * d];
            p[visible + j] = (ops.dot_f32)(q, kj) * scale;
        }
    }
    softmax_in_place(&mut p);
    out.fill(0.0);
    let mut off = 0;
    for seg in v {
        let take = seg.len().min(visible - off);
        (ops.packed.accumulate)(seg, kv_head, &p[off..off + take], 0, out);
        off += take;
    }
    if let Some(f) = fresh {
        for j in 0..f.count {
            let w = p[visible + j];
            let vj = &f.v[j * f.stride + kv_head * d..j * f.stride + (kv_head + 1) * d];
            for (a, x) in out.iter_mut().zip(vj) {
                *a += w * x;
            }
        }
    }
}

/// One query token's attention over one layer held as packed segments (sink, body, window — in that order) plus
/// the current token's own K/V unquantized, with the scalar kernels: what `PmkvqStore::attend_and_store`
/// computes. The specification the GPU decode-attention kernel is checked against. `q`: `q_heads·d`; returns
/// `q_heads·d`.
pub fn decode_reference(
    g: KvGeometry,
    k: [&PackedRows; 3],
    v: [&PackedRows; 3],
    q: &[f32],
    cur: Option<(&[f32], &[f32])>,
) -> Vec<f32> {
    let d = g.head_dim;
    let scale = 1.0 / (d as f32).sqrt();
    let stored: usize = k.iter().map(|s| s.len()).sum();
    let fresh = cur.map(|(k, v)| Fresh {
        k,
        v,
        stride: g.kv_dim(),
        count: 1,
    });
    let mut out = vec![0.0f32; g.q_dim()];
    for (h, o) in out.chunks_exact_mut(d).enumerate() {
        let qv = &q[h * d..(h + 1) * d];
        attend_segments(AttnOps::scalar(), &k, &v, stored, fresh, h / g.group(), qv, scale, o);
    }
    out
}

#[cfg(test)]
mod tests;
