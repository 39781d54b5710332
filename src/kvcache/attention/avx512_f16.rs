//! AVX-512 grouped attention over the fp16 cache's rows: each token's row is converted once (`vcvtph2ps`) for
//! every query head of its KV head; scores of 16 tokens are reduced together (the packed kernels' tree), values
//! summed with 64 channels × up to 4 heads in registers. Part of the `AVX512` table in `avx512.rs`.

// The kernels index register arrays by token and head on purpose (accumulators are transposed in memory).
#![allow(clippy::needless_range_loop)]

use super::avx512::{reduce16_ps, MAX_HEADS};
use super::group::{accumulate_f16_per_token, scores_f16_per_token, F16Rows, GroupQuery, Span};
use std::arch::x86_64::*;

pub(super) fn scores(r: &F16Rows<'_>, kvh: usize, q: &GroupQuery, s: Span, out: &mut [f32], stride: usize) {
    let fits = r.d.is_multiple_of(16)
        && q.d == r.d
        && kvh < r.kv_heads
        && (s.t0 + s.len) * r.kv_heads * r.d <= r.data.len()
        && (s.len == 0 || out.len() >= (q.heads - 1) * stride + s.len);
    if !fits {
        return scores_f16_per_token(crate::cpu::kernels(), r, kvh, q, s, out, stride);
    }
    let mut j0 = 0;
    while j0 < q.heads {
        let n = (q.heads - j0).min(MAX_HEADS);
        // SAFETY: AVX-512 F and F16C (this table was chosen by `supported()`); shapes checked above keep every
        // read inside `r.data` and every write inside `out`.
        unsafe {
            match n {
                1 => f16_scores_impl::<1>(r, kvh, q, j0, s, out, stride),
                2 => f16_scores_impl::<2>(r, kvh, q, j0, s, out, stride),
                3 => f16_scores_impl::<3>(r, kvh, q, j0, s, out, stride),
                _ => f16_scores_impl::<4>(r, kvh, q, j0, s, out, stride),
            }
        }
        j0 += n;
    }
}

pub(super) fn accumulate(
    r: &F16Rows<'_>,
    kvh: usize,
    p: &[f32],
    stride: usize,
    s: Span,
    heads: usize,
    acc: &mut [f32],
) {
    let fits = r.d.is_multiple_of(16)
        && kvh < r.kv_heads
        && heads > 0
        && (s.t0 + s.len) * r.kv_heads * r.d <= r.data.len()
        && acc.len() == heads * r.d
        && (s.len == 0 || p.len() >= (heads - 1) * stride + s.len);
    if !fits {
        return accumulate_f16_per_token(crate::cpu::kernels(), r, kvh, p, stride, s, heads, acc);
    }
    let mut j0 = 0;
    while j0 < heads {
        let n = (heads - j0).min(MAX_HEADS);
        // SAFETY: as in `f16_scores`.
        unsafe {
            match n {
                1 => f16_accumulate_impl::<1>(r, kvh, p, stride, s, j0, acc),
                2 => f16_accumulate_impl::<2>(r, kvh, p, stride, s, j0, acc),
                3 => f16_accumulate_impl::<3>(r, kvh, p, stride, s, j0, acc),
                _ => f16_accumulate_impl::<4>(r, kvh, p, stride, s, j0, acc),
            }
        }
        j0 += n;
    }
}

/// f16 scores for heads `j0..j0+H`: each token's row converted once (`vcvtph2ps`) for every head, 16 tokens
/// reduced together.
///
/// # Safety
/// See `f16_scores`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn f16_scores_impl<const H: usize>(
    r: &F16Rows<'_>,
    kvh: usize,
    q: &GroupQuery,
    j0: usize,
    s: Span,
    out: &mut [f32],
    stride: usize,
) {
    let d = r.d;
    let data = r.data.as_ptr() as *const u16;
    let mut accs = [[_mm512_setzero_ps(); 16]; H];
    let mut t = 0;
    while t < s.len {
        let nb = (s.len - t).min(16);
        for u in 0..16 {
            let mut a = [_mm512_setzero_ps(); H];
            if u < nb {
                let row = data.add(((s.t0 + t + u) * r.kv_heads + kvh) * d);
                for c0 in (0..d).step_by(16) {
                    let x = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(c0) as *const __m256i));
                    for (j, aj) in a.iter_mut().enumerate() {
                        *aj = _mm512_fmadd_ps(_mm512_loadu_ps(q.q.as_ptr().add((j0 + j) * d + c0)), x, *aj);
                    }
                }
            }
            for j in 0..H {
                accs[j][u] = a[j];
            }
        }
        let mask: __mmask16 = if nb == 16 { 0xFFFF } else { (1u16 << nb) - 1 };
        for (j, acc) in accs.iter().enumerate() {
            let v = _mm512_mul_ps(reduce16_ps(acc), _mm512_set1_ps(q.scale));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add((j0 + j) * stride + t), mask, v);
        }
        t += nb;
    }
}

/// f16 value sums for heads `j0..j0+H`: 64 channels × H heads in registers across the tokens.
///
/// # Safety
/// See `f16_accumulate`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn f16_accumulate_impl<const H: usize>(
    r: &F16Rows<'_>,
    kvh: usize,
    p: &[f32],
    stride: usize,
    s: Span,
    j0: usize,
    acc: &mut [f32],
) {
    let d = r.d;
    let data = r.data.as_ptr() as *const u16;
    let pp = p.as_ptr();
    for cb in (0..d).step_by(64) {
        let nreg = ((d - cb) / 16).min(4);
        let mut reg = [[_mm512_setzero_ps(); 4]; H];
        for t in 0..s.len {
            let row = data.add(((s.t0 + t) * r.kv_heads + kvh) * d + cb);
            let mut x = [_mm512_setzero_ps(); 4];
            for (i, xi) in x.iter_mut().enumerate().take(nreg) {
                *xi = _mm512_cvtph_ps(_mm256_loadu_si256(row.add(16 * i) as *const __m256i));
            }
            for (j, rj) in reg.iter_mut().enumerate() {
                let w = _mm512_set1_ps(*pp.add((j0 + j) * stride + t));
                for i in 0..nreg {
                    rj[i] = _mm512_fmadd_ps(w, x[i], rj[i]);
                }
            }
        }
        for (j, rj) in reg.iter().enumerate() {
            let dst = acc.as_mut_ptr().add((j0 + j) * d + cb);
            for (i, ri) in rj.iter().enumerate().take(nreg) {
                let o = dst.add(16 * i);
                _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), *ri));
            }
        }
    }
}
