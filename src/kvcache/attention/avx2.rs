//! AVX2 fused attention over packed rows (groups that are multiples of 32; others use the scalar kernels).

use super::{scalar, AttnKernels};
use crate::kvcache::quant::{Bits, PackedRows};
use std::arch::x86_64::*;

pub fn supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

pub static AVX2: AttnKernels = AttnKernels {
    name: "avx2",
    scores,
    accumulate,
};

fn scores(rows: &PackedRows, head: usize, q: &[f32], scale: f32, t0: usize, out: &mut [f32]) {
    if !rows.group.is_multiple_of(32) {
        return scalar::scores(rows, head, q, scale, t0, out);
    }
    // SAFETY: selected only when the CPU has AVX2+FMA; the group is a multiple of 32 (checked above) and all
    // pointer reads stay inside the group slices returned by `group_at` (checked inside).
    unsafe { scores_impl(rows, head, q, scale, t0, out) }
}

fn accumulate(rows: &PackedRows, head: usize, p: &[f32], t0: usize, acc: &mut [f32]) {
    if !rows.group.is_multiple_of(32) {
        return scalar::accumulate(rows, head, p, t0, acc);
    }
    // SAFETY: as for `scores`.
    unsafe { accumulate_impl(rows, head, p, t0, acc) }
}

/// Codes of channels `c0..c0+8` of one packed group of `g` codes, as f32.
///
/// # Safety
/// AVX2 must be available; `c0` a multiple of 8 below `g`, `g` a multiple of 32, `bytes` the whole group.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn codes8(bytes: &[u8], bits: Bits, c0: usize, g: usize) -> __m256 {
    let p = bytes.as_ptr();
    let v = match bits {
        Bits::B16 => _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(2 * c0) as *const __m128i)),
        Bits::B8 => _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(c0) as *const __m128i)),
        Bits::B4 => {
            let h = g / 2;
            if c0 < h {
                _mm256_and_si256(
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(c0) as *const __m128i)),
                    _mm256_set1_epi32(0x0F),
                )
            } else {
                _mm256_srli_epi32(
                    _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(c0 - h) as *const __m128i)),
                    4,
                )
            }
        }
        Bits::B2 => {
            let qd = g / 4;
            let (k, j0) = (c0 / qd, c0 % qd);
            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(j0) as *const __m128i));
            _mm256_and_si256(
                _mm256_srlv_epi32(b, _mm256_set1_epi32(2 * k as i32)),
                _mm256_set1_epi32(3),
            )
        }
    };
    _mm256_cvtepi32_ps(v)
}

#[inline(always)]
/// # Safety
/// Only called from kernels compiled for, and selected on, a CPU with these SIMD features; slices in bounds.
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// Codes `c0..c0+16` (c0 a multiple of 16) of one packed 8/4/2-bit group as 16 i16 lanes.
///
/// # Safety
/// AVX2; `g` a multiple of 32, `bytes` the whole group, `bits` not 16.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn codes16(bytes: &[u8], bits: Bits, c0: usize, g: usize) -> __m256i {
    let p = bytes.as_ptr();
    let b = match bits {
        Bits::B8 | Bits::B16 => _mm_loadu_si128(p.add(c0) as *const __m128i),
        Bits::B4 => {
            let h = g / 2;
            let v = _mm_loadu_si128(p.add(c0 % h) as *const __m128i);
            let v = if c0 < h { v } else { _mm_srli_epi16(v, 4) };
            _mm_and_si128(v, _mm_set1_epi8(0x0F))
        }
        Bits::B2 => {
            // two 8-code halves, each from one plane (a plane is g/4 ≥ 8 codes)
            let qd = g / 4;
            let half = |c: usize| {
                let (k, j) = (c / qd, c % qd);
                let v = _mm_loadl_epi64(p.add(j) as *const __m128i);
                _mm_and_si128(_mm_srl_epi16(v, _mm_cvtsi32_si128(2 * k as i32)), _mm_set1_epi8(3))
            };
            _mm_unpacklo_epi64(half(c0), half(c0 + 8))
        }
    };
    _mm256_cvtepu8_epi16(b)
}

/// Scores over 8/4/2-bit codes in integers: the query is rounded to i16 per group (relative error ≤ 2^-16 of
/// its largest element), so `Σ q·code` is one `pmaddwd` per 16 codes and the bytes read shrink with the width.
///
/// # Safety
/// See `scores`.
#[target_feature(enable = "avx2,fma")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn scores_int_impl(rows: &PackedRows, head: usize, q: &[f32], scale: f32, t0: usize, out: &mut [f32]) {
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    assert!(q.len() >= gph * g && rows.bits != Bits::B16);
    let mut q16 = vec![0i16; gph * g];
    let mut qscale = vec![0f32; gph];
    let mut qsum = vec![0f32; gph];
    for k in 0..gph {
        let qk = &q[k * g..(k + 1) * g];
        let amax = qk.iter().fold(0f32, |m, v| m.max(v.abs()));
        qscale[k] = amax / 32767.0;
        let inv = if amax > 0.0 { 32767.0 / amax } else { 0.0 };
        for (d, &v) in q16[k * g..(k + 1) * g].iter_mut().zip(qk) {
            *d = (v * inv).round() as i16;
        }
        qsum[k] = qk.iter().sum();
    }
    for (t, o) in out.iter_mut().enumerate().take(rows.len().saturating_sub(t0)) {
        let mut s = 0.0f32;
        for k in 0..gph {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            assert!(bytes.len() == rows.bits.group_bytes(g));
            let qk = q16.as_ptr().add(k * g);
            let mut acc = _mm256_setzero_si256();
            let mut c0 = 0;
            while c0 < g {
                let qv = _mm256_loadu_si256(qk.add(c0) as *const __m256i);
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(codes16(bytes, rows.bits, c0, g), qv));
                c0 += 16;
            }
            let dot = hsum(_mm256_cvtepi32_ps(acc));
            s += sc * qscale[k] * dot + mn * qsum[k];
        }
        *o = s * scale;
    }
}

/// # Safety
/// See `scores`.
#[target_feature(enable = "avx2,fma")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn scores_impl(rows: &PackedRows, head: usize, q: &[f32], scale: f32, t0: usize, out: &mut [f32]) {
    if rows.bits != Bits::B16 {
        return scores_int_impl(rows, head, q, scale, t0, out);
    }
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    assert!(q.len() >= gph * g);
    let qsum: Vec<f32> = q.chunks_exact(g).map(|c| c.iter().sum()).collect();
    for (t, o) in out.iter_mut().enumerate().take(rows.len().saturating_sub(t0)) {
        let mut s = 0.0f32;
        for (k, &qs) in qsum.iter().enumerate().take(gph) {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            assert!(bytes.len() == rows.bits.group_bytes(g));
            let qk = q.as_ptr().add(k * g);
            let mut a0 = _mm256_setzero_ps();
            let mut a1 = _mm256_setzero_ps();
            let mut c0 = 0;
            while c0 + 16 <= g {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qk.add(c0)), codes8(bytes, rows.bits, c0, g), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qk.add(c0 + 8)), codes8(bytes, rows.bits, c0 + 8, g), a1);
                c0 += 16;
            }
            s += sc * hsum(_mm256_add_ps(a0, a1)) + mn * qs;
        }
        *o = s * scale;
    }
}

/// # Safety
/// See `accumulate`.
#[target_feature(enable = "avx2,fma")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn accumulate_impl(rows: &PackedRows, head: usize, p: &[f32], t0: usize, acc: &mut [f32]) {
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    let n = rows.len().saturating_sub(t0).min(p.len());
    assert!(acc.len() >= gph * g);
    for k in 0..gph {
        let mut base = 0.0f32;
        let mut cb = 0;
        while cb < g {
            // up to 64 channels (8 registers) stay in registers across all tokens
            let nreg = ((g - cb) / 8).min(8);
            let mut r = [_mm256_setzero_ps(); 8];
            for (t, &pt) in p.iter().enumerate().take(n) {
                let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
                assert!(bytes.len() == rows.bits.group_bytes(g));
                if cb == 0 {
                    base += pt * mn;
                }
                let w = _mm256_set1_ps(pt * sc);
                for (i, ri) in r.iter_mut().enumerate().take(nreg) {
                    *ri = _mm256_fmadd_ps(w, codes8(bytes, rows.bits, cb + 8 * i, g), *ri);
                }
            }
            for (i, ri) in r.iter().enumerate().take(nreg) {
                let dst = acc.as_mut_ptr().add(k * g + cb + 8 * i);
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *ri));
            }
            cb += 8 * nreg;
        }
        let b = _mm256_set1_ps(base);
        for c0 in (0..g).step_by(8) {
            let dst = acc.as_mut_ptr().add(k * g + c0);
            _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), b));
        }
    }
}
