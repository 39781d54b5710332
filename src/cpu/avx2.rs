//! AVX2 + FMA + F16C kernels, the same arithmetic as `scalar.rs` (integer block sums are exact, so only the
//! order of the f32 accumulation differs).

use super::{Kernels, Q8Row, QK};
use half::f16;
use std::arch::x86_64::*;

pub fn supported() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
}

pub static AVX2: Kernels = Kernels {
    name: "avx2",
    quantize_q8,
    dot_q4_0,
    dot_q4_1,
    dot_q8_0,
    dot4_q4_0,
    dot4_q4_1,
    dot4_q8_0,
    dot_f32,
    dot_f16,
    axpy_f16,
    exp_sum,
    panel_dot: None,
};

// Each safe wrapper is only reachable through `AVX2`, which `kernels()` selects only when `supported()`.

fn quantize_q8(x: &[f32], out: &mut Q8Row) {
    // SAFETY: AVX2 is only selected when the CPU reports avx2+fma+f16c.
    unsafe { quantize_q8_impl(x, out) }
}
fn dot_q4_0(row: &[u8], x: &Q8Row) -> f32 {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot_q4_impl::<false>(row, x) }
}
fn dot_q4_1(row: &[u8], x: &Q8Row) -> f32 {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot_q4_impl::<true>(row, x) }
}
fn dot_q8_0(row: &[u8], x: &Q8Row) -> f32 {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot_q8_0_impl(row, x) }
}
fn dot4_q4_0(row: &[u8], x: [&Q8Row; 4]) -> [f32; 4] {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot4_impl::<0>(row, x) }
}
fn dot4_q4_1(row: &[u8], x: [&Q8Row; 4]) -> [f32; 4] {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot4_impl::<1>(row, x) }
}
fn dot4_q8_0(row: &[u8], x: [&Q8Row; 4]) -> [f32; 4] {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot4_impl::<2>(row, x) }
}
fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot_f32_impl(a, b) }
}
fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    // SAFETY: as above; lengths are checked inside.
    unsafe { dot_f16_impl(a, b) }
}
fn axpy_f16(w: f32, row: &[f16], acc: &mut [f32]) {
    // SAFETY: as above; lengths are checked inside.
    unsafe { axpy_f16_impl(w, row, acc) }
}

fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    // SAFETY: as above; all accesses are within `x`.
    unsafe { exp_sum_impl(x, max) }
}

#[inline(always)]
/// # Safety
/// Only called from kernels compiled for, and selected on, a CPU with these SIMD features; slices in bounds.
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn hsum_ps(v: __m256) -> f32 {
    let lo = _mm256_castps256_ps128(v);
    let hi = _mm256_extractf128_ps(v, 1);
    let s = _mm_add_ps(lo, hi);
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

#[inline(always)]
/// # Safety
/// Only called from kernels compiled for, and selected on, a CPU with these SIMD features; slices in bounds.
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn f16_at(p: *const u8) -> f32 {
    f16::from_bits(u16::from_le_bytes([*p, *p.add(1)])).to_f32()
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn quantize_q8_impl(x: &[f32], out: &mut Q8Row) {
    assert!(x.len().is_multiple_of(QK));
    let nb = x.len() / QK;
    out.d.clear();
    out.s.clear();
    out.qs.clear();
    out.qs.resize(x.len(), 0);
    let sign_mask = _mm256_set1_ps(-0.0);
    for b in 0..nb {
        let p = x.as_ptr().add(b * QK);
        let v = [
            _mm256_loadu_ps(p),
            _mm256_loadu_ps(p.add(8)),
            _mm256_loadu_ps(p.add(16)),
            _mm256_loadu_ps(p.add(24)),
        ];
        let mut m = _mm256_andnot_ps(sign_mask, v[0]);
        for vi in &v[1..] {
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign_mask, *vi));
        }
        let m128 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        let m128 = _mm_max_ps(m128, _mm_movehl_ps(m128, m128));
        let m128 = _mm_max_ss(m128, _mm_movehdup_ps(m128));
        let amax = _mm_cvtss_f32(m128);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
        let mut sum = _mm256_setzero_si256();
        let q = out.qs.as_mut_ptr().add(b * QK);
        for (i, vi) in v.iter().enumerate() {
            let r = _mm256_round_ps(_mm256_mul_ps(*vi, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            let qi = _mm256_cvtps_epi32(r);
            sum = _mm256_add_epi32(sum, qi);
            let mut tmp = [0i32; 8];
            _mm256_storeu_si256(tmp.as_mut_ptr() as *mut __m256i, qi);
            for (j, t) in tmp.iter().enumerate() {
                *q.add(i * 8 + j) = *t as i8;
            }
        }
        let mut s = [0i32; 8];
        _mm256_storeu_si256(s.as_mut_ptr() as *mut __m256i, sum);
        let sum: i32 = s.iter().sum();
        out.d.push(f16::from_f32(d).to_f32());
        out.s.push(f16::from_f32(sum as f32 * d).to_f32());
    }
}

/// Sum of signed products of 32 i8 pairs in 8 i32 lanes (the sign trick lets `maddubs` take signed x).
#[inline(always)]
/// # Safety
/// Only called from kernels compiled for, and selected on, a CPU with these SIMD features; slices in bounds.
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn mul_sum_i8_pairs(x: __m256i, y: __m256i) -> __m256i {
    let ax = _mm256_sign_epi8(x, x);
    let sy = _mm256_sign_epi8(y, x);
    let dot = _mm256_maddubs_epi16(ax, sy);
    _mm256_madd_epi16(dot, _mm256_set1_epi16(1))
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_q4_impl<const WITH_MIN: bool>(row: &[u8], x: &Q8Row) -> f32 {
    let bb = if WITH_MIN { 20 } else { 18 };
    let nb = row.len() / bb;
    // every length the loop's unchecked reads rely on, the block sums included when Q4_1 reads them
    assert!(row.len() == nb * bb && x.d.len() >= nb && x.qs.len() >= nb * QK && (!WITH_MIN || x.s.len() >= nb));
    let low = _mm256_set1_epi8(0x0F);
    let eight = _mm256_set1_epi8(8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = 0.0f32;
    for b in 0..nb {
        let blk = row.as_ptr().add(b * bb);
        let qs = blk.add(if WITH_MIN { 4 } else { 2 });
        let tmp = _mm_loadu_si128(qs as *const __m128i);
        let nib = _mm256_and_si256(
            _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1),
            low,
        );
        let y = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
        let sumi = if WITH_MIN {
            // nibbles are unsigned 0..15: maddubs takes them as they are.
            _mm256_madd_epi16(_mm256_maddubs_epi16(nib, y), ones)
        } else {
            mul_sum_i8_pairs(_mm256_sub_epi8(nib, eight), y)
        };
        let dd = _mm256_set1_ps(f16_at(blk) * *x.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), acc);
        if WITH_MIN {
            acc_min += f16_at(blk.add(2)) * *x.s.get_unchecked(b);
        }
    }
    hsum_ps(acc) + acc_min
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_q8_0_impl(row: &[u8], x: &Q8Row) -> f32 {
    let nb = row.len() / 34;
    assert!(row.len() == nb * 34 && x.d.len() >= nb && x.qs.len() >= nb * QK);
    let mut acc = _mm256_setzero_ps();
    for b in 0..nb {
        let blk = row.as_ptr().add(b * 34);
        let w = _mm256_loadu_si256(blk.add(2) as *const __m256i);
        let y = _mm256_loadu_si256(x.qs.as_ptr().add(b * QK) as *const __m256i);
        let dd = _mm256_set1_ps(f16_at(blk) * *x.d.get_unchecked(b));
        acc = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(mul_sum_i8_pairs(w, y)), acc);
    }
    hsum_ps(acc)
}

/// One weight row against four activation rows; `KIND` 0 = Q4_0, 1 = Q4_1, 2 = Q8_0. Per activation row the
/// operations and their order are exactly those of the single-row kernels above.
///
/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot4_impl<const KIND: u8>(row: &[u8], x: [&Q8Row; 4]) -> [f32; 4] {
    let bb = match KIND {
        0 => 18,
        1 => 20,
        _ => 34,
    };
    let nb = row.len() / bb;
    assert!(row.len() == nb * bb);
    for xi in &x {
        assert!(xi.d.len() >= nb && xi.s.len() >= nb && xi.qs.len() >= nb * QK);
    }
    let low = _mm256_set1_epi8(0x0F);
    let eight = _mm256_set1_epi8(8);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); 4];
    let mut acc_min = [0.0f32; 4];
    for b in 0..nb {
        let blk = row.as_ptr().add(b * bb);
        let w = match KIND {
            2 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
            _ => {
                let tmp = _mm_loadu_si128(blk.add(if KIND == 1 { 4 } else { 2 }) as *const __m128i);
                let nib = _mm256_and_si256(
                    _mm256_insertf128_si256(_mm256_castsi128_si256(tmp), _mm_srli_epi16(tmp, 4), 1),
                    low,
                );
                if KIND == 0 {
                    _mm256_sub_epi8(nib, eight)
                } else {
                    nib
                }
            }
        };
        let dw = f16_at(blk);
        let mw = if KIND == 1 { f16_at(blk.add(2)) } else { 0.0 };
        for j in 0..4 {
            let xj = x[j];
            let y = _mm256_loadu_si256(xj.qs.as_ptr().add(b * QK) as *const __m256i);
            let sumi = if KIND == 1 {
                _mm256_madd_epi16(_mm256_maddubs_epi16(w, y), ones)
            } else {
                mul_sum_i8_pairs(w, y)
            };
            let dd = _mm256_set1_ps(dw * *xj.d.get_unchecked(b));
            acc[j] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(sumi), acc[j]);
            if KIND == 1 {
                acc_min[j] += mw * *xj.s.get_unchecked(b);
            }
        }
    }
    [
        hsum_ps(acc[0]) + acc_min[0],
        hsum_ps(acc[1]) + acc_min[1],
        hsum_ps(acc[2]) + acc_min[2],
        hsum_ps(acc[3]) + acc_min[3],
    ]
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_f32_impl(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
        i += 16;
    }
    while i + 8 <= n {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += *pa.add(i) * *pb.add(i);
        i += 1;
    }
    s
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_f16_impl(a: &[f16], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr() as *const u16, b.as_ptr());
    let mut acc0 = _mm256_setzero_ps();
    let mut acc1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i) as *const __m128i));
        let h1 = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i + 8) as *const __m128i));
        acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(pb.add(i)), acc0);
        acc1 = _mm256_fmadd_ps(h1, _mm256_loadu_ps(pb.add(i + 8)), acc1);
        i += 16;
    }
    while i + 8 <= n {
        let h0 = _mm256_cvtph_ps(_mm_loadu_si128(pa.add(i) as *const __m128i));
        acc0 = _mm256_fmadd_ps(h0, _mm256_loadu_ps(pb.add(i)), acc0);
        i += 8;
    }
    let mut s = hsum_ps(_mm256_add_ps(acc0, acc1));
    while i < n {
        s += a[i].to_f32() * b[i];
        i += 1;
    }
    s
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn axpy_f16_impl(w: f32, row: &[f16], acc: &mut [f32]) {
    let n = row.len().min(acc.len());
    let (pr, pa) = (row.as_ptr() as *const u16, acc.as_mut_ptr());
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        let h = _mm256_cvtph_ps(_mm_loadu_si128(pr.add(i) as *const __m128i));
        _mm256_storeu_ps(pa.add(i), _mm256_fmadd_ps(wv, h, _mm256_loadu_ps(pa.add(i))));
        i += 8;
    }
    while i < n {
        acc[i] += w * row[i].to_f32();
        i += 1;
    }
}

#[inline(always)]
fn c(bits: u32) -> f32 {
    f32::from_bits(bits)
}

/// exp(x) for 8 lanes: ggml's `ggml_v_expf` (range reduction by ln 2, degree-5 polynomial, ≤ 1.5 ulp), so our
/// softmax rounds like llama.cpp's.
///
/// # Safety
/// The CPU must support AVX2 and FMA.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn v_expf(x: __m256) -> __m256 {
    let r = _mm256_set1_ps(12582912.0); // 0x1.8p23
    let z = _mm256_fmadd_ps(x, _mm256_set1_ps(c(0x3FB8AA3B)), r);
    let n = _mm256_sub_ps(z, r);
    let b = _mm256_fnmadd_ps(
        n,
        _mm256_set1_ps(c(0x35BFBE8E)),
        _mm256_fnmadd_ps(n, _mm256_set1_ps(c(0x3F317200)), x),
    );
    let e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    let k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1.0))));
    let cmask = _mm256_castps_si256(_mm256_cmp_ps(
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), n),
        _mm256_set1_ps(126.0),
        _CMP_GT_OQ,
    ));
    let u = _mm256_mul_ps(b, b);
    let j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_set1_ps(c(0x3C072010)), b, _mm256_set1_ps(c(0x3D2B9F17))),
            u,
            _mm256_fmadd_ps(_mm256_set1_ps(c(0x3E2AAF33)), b, _mm256_set1_ps(c(0x3EFFFEDB))),
        ),
        u,
        _mm256_mul_ps(_mm256_set1_ps(c(0x3F7FFFF6)), b),
    );
    if _mm256_movemask_ps(_mm256_castsi256_ps(cmask)) == 0 {
        return _mm256_fmadd_ps(j, k, k);
    }
    let g = _mm256_and_si256(
        _mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
        _mm256_set1_epi32(0x82000000u32 as i32),
    );
    let s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000)));
    let s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    let d = _mm256_castps_si256(_mm256_cmp_ps(
        _mm256_andnot_ps(_mm256_set1_ps(-0.0), n),
        _mm256_set1_ps(192.0),
        _CMP_GT_OQ,
    ));
    _mm256_or_ps(
        _mm256_and_ps(_mm256_castsi256_ps(d), _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(
            _mm256_castsi256_ps(d),
            _mm256_or_ps(
                _mm256_and_ps(
                    _mm256_castsi256_ps(cmask),
                    _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1),
                ),
                _mm256_andnot_ps(_mm256_castsi256_ps(cmask), _mm256_fmadd_ps(k, j, k)),
            ),
        ),
    )
}

/// # Safety
/// The CPU must support AVX2 and FMA.
#[target_feature(enable = "avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn exp_sum_impl(x: &mut [f32], max: f32) -> f64 {
    let n = x.len();
    let p = x.as_mut_ptr();
    let m = _mm256_set1_ps(max);
    let mut sum = 0.0f64;
    let mut i = 0;
    while i + 8 <= n {
        let v = v_expf(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), m));
        _mm256_storeu_ps(p.add(i), v);
        sum += hsum_ps(v) as f64;
        i += 8;
    }
    while i < n {
        let v = (x[i] - max).exp();
        x[i] = v;
        sum += v as f64;
        i += 1;
    }
    sum
}
