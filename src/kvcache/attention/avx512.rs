//! AVX-512 grouped attention kernels over packed rows (AVX-512 F/BW and VNNI, detected at run time).
//!
//! Scores over 8/4/2-bit codes are integer: 64 codes are unpacked to bytes with one load and one shift+mask
//! (2-bit: the 16 bytes broadcast to the four 128-bit lanes, each lane shifted by its plane), widened to i16 and
//! multiplied with the i16-rounded query by `vpdpwssd` (VNNI), 32 products per instruction, for every query head
//! of the KV head while the codes sit in registers. One token's 16 partial sums per head are not reduced on their
//! own: 16 tokens' accumulators are reduced together by a transpose-and-add tree (45 instructions for 16 tokens),
//! and the scale and offset are applied to 16 tokens at once. 16-bit codes (sink, window, an uncompressed body)
//! take the same path in f32. The value side converts each token's codes to f32 once and adds them into every
//! head's accumulator (64 channels × up to 4 heads in registers across the whole block of tokens).
//!
//! Shapes outside the fast paths (groups other than 64, 128 or a multiple of 256; more than one group per head
//! in scores) use the AVX2 single-head kernels, head by head.

// The kernels index register arrays by token and head on purpose (accumulators are transposed in memory).
#![allow(clippy::needless_range_loop)]

use super::group::{accumulate_per_head, scores_per_head, GroupKernels, GroupQuery, Span};
use crate::kvcache::quant::{Bits, OffsetMode, PackedRows};
use std::arch::x86_64::*;

pub fn supported() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vnni")
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

pub static AVX512: GroupKernels = GroupKernels {
    name: "avx512-vnni",
    scores,
    accumulate,
    scores_f16: super::avx512_f16::scores,
    accumulate_f16: super::avx512_f16::accumulate,
};

/// Groups whose codes the 64-code unpack handles: every 64-channel chunk lies in one nibble half (4-bit) and in
/// whole planes (2-bit).
fn unpackable(g: usize) -> bool {
    g == 64 || g == 128 || g.is_multiple_of(256)
}

/// Query heads one pass keeps in registers.
pub(super) const MAX_HEADS: usize = 4;

fn scores(rows: &PackedRows, kvh: usize, q: &GroupQuery, s: Span, out: &mut [f32], stride: usize) {
    let g = rows.group;
    let int = rows.bits != Bits::B16;
    let fits = rows.groups_per_head() == 1
        && q.group == g
        && q.d == g
        && (if int {
            unpackable(g) && g <= 256
        } else {
            g.is_multiple_of(64)
        })
        && kvh < rows.kv_heads
        && s.t0 + s.len <= rows.len();
    if !fits {
        return scores_per_head(super::attn_kernels(), rows, kvh, q, s, out, stride);
    }
    assert!(out.len() >= (q.heads - 1) * stride + s.len);
    let mut j0 = 0;
    while j0 < q.heads {
        let n = (q.heads - j0).min(MAX_HEADS);
        // SAFETY: `supported()` chose this table (AVX-512 F/BW/VNNI); the shape checks above keep every read in
        // the rows' buffers (tokens t0..t0+len exist, group bytes from `group_bytes`) and every write in `out`
        // (asserted); the head batch j0..j0+n lies in the query.
        unsafe {
            match (rows.bits, n) {
                (Bits::B16, 1) => scores_f16::<1>(rows, kvh, q, j0, s, out, stride),
                (Bits::B16, 2) => scores_f16::<2>(rows, kvh, q, j0, s, out, stride),
                (Bits::B16, 3) => scores_f16::<3>(rows, kvh, q, j0, s, out, stride),
                (Bits::B16, _) => scores_f16::<4>(rows, kvh, q, j0, s, out, stride),
                (Bits::B8, 1) => scores_int::<1, 8>(rows, kvh, q, j0, s, out, stride),
                (Bits::B8, 2) => scores_int::<2, 8>(rows, kvh, q, j0, s, out, stride),
                (Bits::B8, 3) => scores_int::<3, 8>(rows, kvh, q, j0, s, out, stride),
                (Bits::B8, _) => scores_int::<4, 8>(rows, kvh, q, j0, s, out, stride),
                (Bits::B4, 1) => scores_int::<1, 4>(rows, kvh, q, j0, s, out, stride),
                (Bits::B4, 2) => scores_int::<2, 4>(rows, kvh, q, j0, s, out, stride),
                (Bits::B4, 3) => scores_int::<3, 4>(rows, kvh, q, j0, s, out, stride),
                (Bits::B4, _) => scores_int::<4, 4>(rows, kvh, q, j0, s, out, stride),
                (Bits::B2, 1) => scores_int::<1, 2>(rows, kvh, q, j0, s, out, stride),
                (Bits::B2, 2) => scores_int::<2, 2>(rows, kvh, q, j0, s, out, stride),
                (Bits::B2, 3) => scores_int::<3, 2>(rows, kvh, q, j0, s, out, stride),
                (Bits::B2, _) => scores_int::<4, 2>(rows, kvh, q, j0, s, out, stride),
            }
        }
        j0 += n;
    }
}

fn accumulate(rows: &PackedRows, kvh: usize, p: &[f32], stride: usize, s: Span, heads: usize, acc: &mut [f32]) {
    let g = rows.group;
    let fits = g.is_multiple_of(64)
        && (rows.bits == Bits::B16 || unpackable(g))
        && kvh < rows.kv_heads
        && s.t0 + s.len <= rows.len()
        && heads > 0
        && acc.len() == heads * rows.head_dim
        && p.len() >= (heads - 1) * stride + s.len;
    if !fits {
        return accumulate_per_head(super::attn_kernels(), rows, kvh, p, stride, s, heads, acc);
    }
    let mut j0 = 0;
    while j0 < heads {
        let n = (heads - j0).min(MAX_HEADS);
        // SAFETY: as in `scores`: shapes checked above, so all reads and writes stay in bounds.
        unsafe {
            match (rows.bits, n) {
                (Bits::B16, 1) => accumulate_impl::<1, 16>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B16, 2) => accumulate_impl::<2, 16>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B16, 3) => accumulate_impl::<3, 16>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B16, _) => accumulate_impl::<4, 16>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B8, 1) => accumulate_impl::<1, 8>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B8, 2) => accumulate_impl::<2, 8>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B8, 3) => accumulate_impl::<3, 8>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B8, _) => accumulate_impl::<4, 8>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B4, 1) => accumulate_impl::<1, 4>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B4, 2) => accumulate_impl::<2, 4>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B4, 3) => accumulate_impl::<3, 4>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B4, _) => accumulate_impl::<4, 4>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B2, 1) => accumulate_impl::<1, 2>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B2, 2) => accumulate_impl::<2, 2>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B2, 3) => accumulate_impl::<3, 2>(rows, kvh, p, stride, s, j0, acc),
                (Bits::B2, _) => accumulate_impl::<4, 2>(rows, kvh, p, stride, s, j0, acc),
            }
        }
        j0 += n;
    }
}

/// The width a kernel was instantiated for.
const fn bits_of(b: u32) -> Bits {
    match b {
        16 => Bits::B16,
        8 => Bits::B8,
        4 => Bits::B4,
        _ => Bits::B2,
    }
}

/// Codes `c0..c0+64` of one packed 8/4/2-bit group of `g` codes as 64 bytes.
///
/// # Safety
/// AVX-512 F/BW; `p` points at the whole group (`bits.group_bytes(g)` bytes); `unpackable(g)`; `c0` a multiple
/// of 64 below `g`.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn codes64(p: *const u8, bits: Bits, c0: usize, g: usize) -> __m512i {
    match bits {
        Bits::B8 | Bits::B16 => _mm512_loadu_si512(p.add(c0) as *const _),
        Bits::B4 => {
            let m = _mm512_set1_epi8(0x0F);
            if g == 64 {
                let b = _mm256_loadu_si256(p as *const __m256i);
                let lo = _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
                let hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), _mm256_set1_epi8(0x0F));
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
            } else {
                let h = g / 2;
                let b = _mm512_loadu_si512(p.add(c0 % h) as *const _);
                if c0 < h {
                    _mm512_and_si512(b, m)
                } else {
                    _mm512_and_si512(_mm512_srli_epi16(b, 4), m)
                }
            }
        }
        Bits::B2 => {
            let m = _mm512_set1_epi8(0x03);
            match g {
                // four planes of 16 codes: each 128-bit lane takes the 16 bytes, shifted by its plane
                64 => {
                    let b = _mm512_broadcast_i32x4(_mm_loadu_si128(p as *const __m128i));
                    let sh = _mm512_set_epi64(
                        6 * 0x0001_0001_0001_0001,
                        6 * 0x0001_0001_0001_0001,
                        4 * 0x0001_0001_0001_0001,
                        4 * 0x0001_0001_0001_0001,
                        2 * 0x0001_0001_0001_0001,
                        2 * 0x0001_0001_0001_0001,
                        0,
                        0,
                    );
                    _mm512_and_si512(_mm512_srlv_epi16(b, sh), m)
                }
                // planes of 32 codes: chunk c holds planes 2c and 2c+1
                128 => {
                    let b = _mm512_broadcast_i64x4(_mm256_loadu_si256(p as *const __m256i));
                    let k = (c0 / 32) as i64;
                    let (lo, hi) = (2 * k * 0x0001_0001_0001_0001, (2 * k + 2) * 0x0001_0001_0001_0001);
                    let sh = _mm512_set_epi64(hi, hi, hi, hi, lo, lo, lo, lo);
                    _mm512_and_si512(_mm512_srlv_epi16(b, sh), m)
                }
                _ => {
                    let qd = g / 4;
                    let (k, j) = (c0 / qd, c0 % qd);
                    let b = _mm512_loadu_si512(p.add(j) as *const _);
                    _mm512_and_si512(_mm512_srl_epi16(b, _mm_cvtsi32_si128(2 * k as i32)), m)
                }
            }
        }
    }
}

/// Sixteen vectors → one whose lane `u` is the sum of vector `u`'s lanes (a transpose-and-add tree).
macro_rules! reduce16 {
    ($v:expr, $add:ident, $ulo32:ident, $uhi32:ident, $ulo64:ident, $uhi64:ident, $shuf:ident) => {{
        let v = $v;
        let mut s1 = [v[0]; 8];
        for k in 0..8 {
            s1[k] = $add($ulo32(v[2 * k], v[2 * k + 1]), $uhi32(v[2 * k], v[2 * k + 1]));
        }
        let mut s2 = [s1[0]; 4];
        for k in 0..4 {
            s2[k] = $add($ulo64(s1[2 * k], s1[2 * k + 1]), $uhi64(s1[2 * k], s1[2 * k + 1]));
        }
        // each 128-bit lane L of s2[k] holds the lane-L partial sums of vectors 4k..4k+3
        let x01 = $add($shuf::<0x88>(s2[0], s2[1]), $shuf::<0xDD>(s2[0], s2[1]));
        let x23 = $add($shuf::<0x88>(s2[2], s2[3]), $shuf::<0xDD>(s2[2], s2[3]));
        $add($shuf::<0x88>(x01, x23), $shuf::<0xDD>(x01, x23))
    }};
}

#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; AVX-512 F must be available.
unsafe fn reduce16_epi32(v: &[__m512i; 16]) -> __m512i {
    reduce16!(
        v,
        _mm512_add_epi32,
        _mm512_unpacklo_epi32,
        _mm512_unpackhi_epi32,
        _mm512_unpacklo_epi64,
        _mm512_unpackhi_epi64,
        _mm512_shuffle_i32x4
    )
}

#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; AVX-512 F must be available.
pub(super) unsafe fn reduce16_ps(v: &[__m512; 16]) -> __m512 {
    reduce16!(
        v,
        _mm512_add_ps,
        _mm512_unpacklo_ps,
        _mm512_unpackhi_ps,
        unpacklo_pd_ps,
        unpackhi_pd_ps,
        _mm512_shuffle_f32x4
    )
}

#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; AVX-512 F must be available.
unsafe fn unpacklo_pd_ps(a: __m512, b: __m512) -> __m512 {
    _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
}

#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; AVX-512 F must be available.
unsafe fn unpackhi_pd_ps(a: __m512, b: __m512) -> __m512 {
    _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)))
}

/// Scales and offsets of the groups `gi0, gi0+step, …` (16 of them, or `n`), as f32 vectors: with a small step
/// and room to read ahead, two loads and one `vpermt2w` pick the 16 f16 values; otherwise one by one.
///
/// # Safety
/// AVX-512 F/BW; the `n ≤ 16` groups exist.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn params16(rows: &PackedRows, gi0: usize, step: usize, n: usize) -> (__m512, __m512) {
    let scale = pick16(&rows.scale, gi0, step, n);
    let offset = match rows.offset_mode {
        OffsetMode::Stored => pick16(&rows.offset, gi0, step, n),
        OffsetMode::Symmetric { center } => _mm512_mul_ps(scale, _mm512_set1_ps(-(center as f32))),
    };
    (scale, offset)
}

/// `v[gi0 + u·step]` for `u < n` (zeros after), as f32.
///
/// # Safety
/// AVX-512 F/BW; the `n ≤ 16` values exist.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn pick16(v: &[half::f16], gi0: usize, step: usize, n: usize) -> __m512 {
    if step <= 4 && gi0 + 64 <= v.len() {
        let p = v.as_ptr().add(gi0) as *const i16;
        let (a, b) = (
            _mm512_loadu_si512(p as *const _),
            _mm512_loadu_si512(p.add(32) as *const _),
        );
        // lane u picks word u·step of the 64 loaded (a: words 0..32, b: 32..64)
        let idx = _mm512_mullo_epi16(
            _mm512_set_epi64(
                0,
                0,
                0,
                0,
                0x000f_000e_000d_000c,
                0x000b_000a_0009_0008,
                0x0007_0006_0005_0004,
                0x0003_0002_0001_0000,
            ),
            _mm512_set1_epi16(step as i16),
        );
        let w = _mm512_permutex2var_epi16(a, idx, b);
        let w = _mm512_maskz_mov_epi16(if n >= 16 { 0xFFFF } else { (1u32 << n) - 1 }, w);
        _mm512_cvtph_ps(_mm512_castsi512_si256(w))
    } else {
        let mut h = [0u16; 16];
        for (u, x) in h.iter_mut().enumerate().take(n) {
            *x = v[gi0 + u * step].to_bits();
        }
        _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i))
    }
}

/// Integer scores for query heads `j0..j0+H` over 8/4/2-bit codes (one group per head).
///
/// # Safety
/// See `scores`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn scores_int<const H: usize, const B: u32>(
    rows: &PackedRows,
    kvh: usize,
    q: &GroupQuery,
    j0: usize,
    s: Span,
    out: &mut [f32],
    stride: usize,
) {
    let (g, gpt, gb) = (rows.group, rows.groups_per_token(), rows.group_bytes());
    let data = rows.data.as_ptr();
    let mut accs = [[_mm512_setzero_si512(); 16]; H];
    let mut t = 0;
    while t < s.len {
        let nb = (s.len - t).min(16);
        for u in 0..16 {
            let mut a = [_mm512_setzero_si512(); H];
            if u < nb {
                let p = data.add(((s.t0 + t + u) * gpt + kvh) * gb);
                for c0 in (0..g).step_by(64) {
                    let codes = codes64(p, bits_of(B), c0, g);
                    let lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(codes));
                    let hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64::<1>(codes));
                    for (j, aj) in a.iter_mut().enumerate() {
                        let qp = q.q16.as_ptr().add((j0 + j) * g + c0);
                        *aj = _mm512_dpwssd_epi32(*aj, lo, _mm512_loadu_si512(qp as *const _));
                        *aj = _mm512_dpwssd_epi32(*aj, hi, _mm512_loadu_si512(qp.add(32) as *const _));
                    }
                }
            }
            for j in 0..H {
                accs[j][u] = a[j];
            }
        }
        let (sc, mn) = params16(rows, (s.t0 + t) * gpt + kvh, gpt, nb);
        let mask: __mmask16 = if nb == 16 { 0xFFFF } else { (1u16 << nb) - 1 };
        for (j, acc) in accs.iter().enumerate() {
            let hj = j0 + j;
            let dot = _mm512_cvtepi32_ps(reduce16_epi32(acc));
            let v = _mm512_fmadd_ps(
                _mm512_mul_ps(dot, _mm512_set1_ps(q.qscale[hj])),
                sc,
                _mm512_mul_ps(mn, _mm512_set1_ps(q.qsum[hj])),
            );
            let v = _mm512_mul_ps(v, _mm512_set1_ps(q.scale));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(hj * stride + t), mask, v);
        }
        t += nb;
    }
}

/// Scores for query heads `j0..j0+H` over 16-bit codes (one group per head), in f32.
///
/// # Safety
/// See `scores`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn scores_f16<const H: usize>(
    rows: &PackedRows,
    kvh: usize,
    q: &GroupQuery,
    j0: usize,
    s: Span,
    out: &mut [f32],
    stride: usize,
) {
    let (g, gpt, gb) = (rows.group, rows.groups_per_token(), rows.group_bytes());
    let data = rows.data.as_ptr();
    let mut accs = [[_mm512_setzero_ps(); 16]; H];
    let mut t = 0;
    while t < s.len {
        let nb = (s.len - t).min(16);
        for u in 0..16 {
            let mut a = [_mm512_setzero_ps(); H];
            if u < nb {
                let p = data.add(((s.t0 + t + u) * gpt + kvh) * gb) as *const u16;
                for c0 in (0..g).step_by(16) {
                    let x = _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(c0) as *const __m256i)));
                    for (j, aj) in a.iter_mut().enumerate() {
                        let qv = _mm512_loadu_ps(q.q.as_ptr().add((j0 + j) * g + c0));
                        *aj = _mm512_fmadd_ps(qv, x, *aj);
                    }
                }
            }
            for j in 0..H {
                accs[j][u] = a[j];
            }
        }
        let (sc, mn) = params16(rows, (s.t0 + t) * gpt + kvh, gpt, nb);
        let mask: __mmask16 = if nb == 16 { 0xFFFF } else { (1u16 << nb) - 1 };
        for (j, acc) in accs.iter().enumerate() {
            let hj = j0 + j;
            let dot = reduce16_ps(acc);
            let v = _mm512_fmadd_ps(dot, sc, _mm512_mul_ps(mn, _mm512_set1_ps(q.qsum[hj])));
            let v = _mm512_mul_ps(v, _mm512_set1_ps(q.scale));
            _mm512_mask_storeu_ps(out.as_mut_ptr().add(hj * stride + t), mask, v);
        }
        t += nb;
    }
}

/// Codes `c0..c0+64` of a group as four f32 vectors of 16: bytes are zero-extended straight from memory
/// (`vpmovzxbd`), then each plane or nibble is one shift and mask, so a token costs one or two cross-lane
/// operations rather than one per 16 codes.
///
/// # Safety
/// As `codes64`; for 16 bits, `p` points at the group's `2g` bytes and `c0 + 64 ≤ g`.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn codes64_f32(p: *const u8, bits: Bits, c0: usize, g: usize) -> [__m512; 4] {
    match bits {
        Bits::B16 => {
            let w = p as *const u16;
            let f = |i: usize| w.add(c0 + 16 * i) as *const __m256i;
            [
                _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(f(0)))),
                _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(f(1)))),
                _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(f(2)))),
                _mm512_cvtepi32_ps(_mm512_cvtepu16_epi32(_mm256_loadu_si256(f(3)))),
            ]
        }
        Bits::B8 => [
            field(zx16(p.add(c0)), 0, 0xFF),
            field(zx16(p.add(c0 + 16)), 0, 0xFF),
            field(zx16(p.add(c0 + 32)), 0, 0xFF),
            field(zx16(p.add(c0 + 48)), 0, 0xFF),
        ],
        Bits::B4 if g == 64 => {
            let (a, b) = (zx16(p), zx16(p.add(16)));
            [field(a, 0, 15), field(b, 0, 15), field(a, 4, 15), field(b, 4, 15)]
        }
        Bits::B4 => {
            let h = g / 2;
            let (at, sh) = if c0 < h { (c0, 0) } else { (c0 - h, 4) };
            [
                field(zx16(p.add(at)), sh, 15),
                field(zx16(p.add(at + 16)), sh, 15),
                field(zx16(p.add(at + 32)), sh, 15),
                field(zx16(p.add(at + 48)), sh, 15),
            ]
        }
        Bits::B2 if g == 64 => {
            let x = zx16(p);
            [field(x, 0, 3), field(x, 2, 3), field(x, 4, 3), field(x, 6, 3)]
        }
        Bits::B2 if g == 128 => {
            let (a, b) = (zx16(p), zx16(p.add(16)));
            let k = 2 * (c0 / 32) as u32;
            [field(a, k, 3), field(b, k, 3), field(a, k + 2, 3), field(b, k + 2, 3)]
        }
        Bits::B2 => {
            let qd = g / 4;
            let (k, j) = (2 * (c0 / qd) as u32, c0 % qd);
            [
                field(zx16(p.add(j)), k, 3),
                field(zx16(p.add(j + 16)), k, 3),
                field(zx16(p.add(j + 32)), k, 3),
                field(zx16(p.add(j + 48)), k, 3),
            ]
        }
    }
}

/// 16 bytes at `p`, zero-extended to i32 lanes.
///
/// # Safety
/// AVX-512 F; 16 readable bytes at `p`.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn zx16(p: *const u8) -> __m512i {
    _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))
}

/// `((x >> sh) & mask)` as f32.
///
/// # Safety
/// AVX-512 F.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn field(x: __m512i, sh: u32, mask: i32) -> __m512 {
    _mm512_cvtepi32_ps(_mm512_and_si512(
        _mm512_srlv_epi32(x, _mm512_set1_epi32(sh as i32)),
        _mm512_set1_epi32(mask),
    ))
}

/// `acc[j·d + c] += Σ_t p[j·stride + t]·x̂[t0+t][c]` for heads `j0..j0+H`: 64 channels × H heads stay in
/// registers across the tokens; each token's codes are converted once for all heads.
///
/// # Safety
/// See `accumulate`.
#[target_feature(enable = "avx512f,avx512bw,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn accumulate_impl<const H: usize, const B: u32>(
    rows: &PackedRows,
    kvh: usize,
    p: &[f32],
    stride: usize,
    s: Span,
    j0: usize,
    acc: &mut [f32],
) {
    let (g, gph, gpt, gb) = (
        rows.group,
        rows.groups_per_head(),
        rows.groups_per_token(),
        rows.group_bytes(),
    );
    let d = rows.head_dim;
    let data = rows.data.as_ptr();
    let pp = p.as_ptr();
    // per 16 tokens: the weights p·scale of every head, and the offset term Σ p·offset in vectors
    let mut w = [[0f32; 16]; H];
    for k in 0..gph {
        let mut base = [_mm512_setzero_ps(); H];
        for c0 in (0..g).step_by(64) {
            let mut r = [[_mm512_setzero_ps(); 4]; H];
            let mut t = 0;
            while t < s.len {
                let nb = (s.len - t).min(16);
                let gi0 = (s.t0 + t) * gpt + kvh * gph + k;
                let (sc, mn) = params16(rows, gi0, gpt, nb);
                let mask: __mmask16 = if nb == 16 { 0xFFFF } else { (1u16 << nb) - 1 };
                for j in 0..H {
                    let pv = _mm512_maskz_loadu_ps(mask, pp.add((j0 + j) * stride + t));
                    _mm512_storeu_ps(w[j].as_mut_ptr(), _mm512_mul_ps(pv, sc));
                    if c0 == 0 {
                        base[j] = _mm512_fmadd_ps(pv, mn, base[j]);
                    }
                }
                for u in 0..nb {
                    let x = codes64_f32(data.add((gi0 + u * gpt) * gb), bits_of(B), c0, g);
                    for (j, rj) in r.iter_mut().enumerate() {
                        let wv = _mm512_set1_ps(w[j][u]);
                        for (ri, xi) in rj.iter_mut().zip(&x) {
                            *ri = _mm512_fmadd_ps(wv, *xi, *ri);
                        }
                    }
                }
                t += nb;
            }
            for (j, rj) in r.iter().enumerate() {
                let b = _mm512_set1_ps(_mm512_reduce_add_ps(base[j]));
                let dst = acc.as_mut_ptr().add((j0 + j) * d + k * g + c0);
                for (i, ri) in rj.iter().enumerate() {
                    let o = dst.add(16 * i);
                    _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), _mm512_add_ps(*ri, b)));
                }
            }
        }
    }
}
