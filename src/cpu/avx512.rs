//! AVX-512 VNNI dot products of quantized weight rows with 8-bit activation rows (Q4_0, Q4_1, Q8_0), chosen
//! over the AVX2 table when the CPU has AVX-512 F/BW/VL and VNNI; the rest of the table is AVX2's.
//!
//! Two blocks (64 weights) go through one `vpdpbusd` (64 u8 × s8 products into 16 i32 lanes, 8 per block):
//! a Q4 block's 16 bytes are broadcast to two 128-bit lanes and shifted by 0 and 4 (`vpsrlvw`) so low and high
//! nibbles land in the activations' order with no shuffle; signed weights or the Q4_0 offset are handled exactly
//! in integers (`(w+128)·a − 128·Σa`, `n·a − 8·Σa`). A pair's two f16 scales (and Q4_1 minimums) are converted
//! by one `vcvtph2ps`, multiplied with the activations' two scales and spread over the lanes by one permute (a
//! pre-pass that stored them for 16 blocks stalled on store forwarding).
//! The 4-row form unpacks each weight pair once for four activation rows; per row its operations and their
//! order are exactly the 1-row form's, so batched and single results agree bit for bit.

use super::panel::{Q8Panel, PANEL_ROWS};
use super::{avx2, BlockFormat, Kernels, Q8Row, QK};
use std::arch::x86_64::*;

pub fn supported() -> bool {
    avx2::supported()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

pub static AVX512: Kernels = Kernels {
    name: "avx512-vnni",
    quantize_q8: avx2::AVX2.quantize_q8,
    dot_q4_0: |w, x| dot::<0, 1>(w, [x; 1])[0],
    dot_q4_1: |w, x| dot::<1, 1>(w, [x; 1])[0],
    dot_q8_0: |w, x| dot::<2, 1>(w, [x; 1])[0],
    dot4_q4_0: dot::<0, 4>,
    dot4_q4_1: dot::<1, 4>,
    dot4_q8_0: dot::<2, 4>,
    dot_f32: avx2::AVX2.dot_f32,
    dot_f16: avx2::AVX2.dot_f16,
    axpy_f16: avx2::AVX2.axpy_f16,
    exp_sum: avx2::AVX2.exp_sum,
    panel_dot: Some(panel_dot),
};

/// `KIND` 0 = Q4_0, 1 = Q4_1, 2 = Q8_0; `N` activation rows.
fn dot<const KIND: u8, const N: usize>(row: &[u8], x: [&Q8Row; N]) -> [f32; N] {
    let bb = block_bytes(KIND);
    let nb = row.len() / bb;
    assert!(row.len() == nb * bb);
    for xi in &x {
        assert!(xi.d.len() >= nb && xi.qs.len() >= nb * QK && (KIND != 1 || xi.s.len() >= nb));
    }
    // SAFETY: `AVX512` is selected only when `supported()`; the lengths every unchecked read relies on are
    // asserted above (whole blocks in `row`, `nb` scales and 32·nb codes per activation row).
    unsafe { dot_impl::<KIND, N>(row, nb, x) }
}

const fn block_bytes(kind: u8) -> usize {
    match kind {
        0 => 18,
        1 => 20,
        _ => 34,
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C; `row` holds `nb` whole blocks; every `x` has `nb` scales (and sums
/// for Q4_1) and `32·nb` codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_impl<const KIND: u8, const N: usize>(row: &[u8], nb: usize, x: [&Q8Row; N]) -> [f32; N] {
    let bb = block_bytes(KIND);
    let base = row.as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut acc_min = [_mm_setzero_ps(); N];
    // lanes 0..8 take the pair's first scale, lanes 8..16 its second
    let pick = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let shifts = _mm512_set_epi64(
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
        0,
        0,
        0x0004_0004_0004_0004,
        0x0004_0004_0004_0004,
        0,
        0,
    );
    let low = _mm512_set1_epi8(0x0F);
    let eight = _mm512_set1_epi8(8);
    let bias = _mm512_set1_epi8(-128);
    // two blocks per step (a lone last block with its partner's half masked off)
    let mut b = 0;
    while b < nb {
        let two = b + 1 < nb;
        let kmask: __mmask64 = if two { u64::MAX } else { 0xFFFF_FFFF };
        let blk = base.add(b * bb);
        // the f16 scale (and Q4_1 minimum) opening each block: [d0, m0, d1, m1]
        let w0 = (blk as *const u32).read_unaligned() as i32;
        let w1 = if two {
            (blk.add(bb) as *const u32).read_unaligned() as i32
        } else {
            0
        };
        let dm = _mm_cvtph_ps(_mm_insert_epi32::<1>(_mm_cvtsi32_si128(w0), w1));
        let dw = _mm_shuffle_ps::<0b10_00_10_00>(dm, dm);
        let w = match KIND {
            2 => {
                let lo = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                let hi = if two {
                    _mm256_loadu_si256(blk.add(bb + 2) as *const __m256i)
                } else {
                    _mm256_setzero_si256()
                };
                // signed weights as unsigned: w + 128
                _mm512_xor_si512(_mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi), bias)
            }
            _ => {
                let q = if KIND == 1 { 4 } else { 2 };
                let b0 = _mm512_broadcast_i32x4(_mm_loadu_si128(blk.add(q) as *const __m128i));
                let both = if two {
                    _mm512_mask_broadcast_i32x4(b0, 0xFF00, _mm_loadu_si128(blk.add(bb + q) as *const __m128i))
                } else {
                    b0
                };
                // lanes: [low nibbles, high nibbles] of block b, then of block b+1
                _mm512_and_si512(_mm512_srlv_epi16(both, shifts), low)
            }
        };
        let w = _mm512_maskz_mov_epi8(kmask, w);
        for j in 0..N {
            let a = _mm512_maskz_loadu_epi8(kmask, x[j].qs.as_ptr().add(b * QK));
            let mut s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
            match KIND {
                0 => s = _mm512_sub_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, a)),
                2 => s = _mm512_sub_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, a)),
                _ => {}
            }
            let dx = if two {
                _mm_castpd_ps(_mm_load_sd(x[j].d.as_ptr().add(b) as *const f64))
            } else {
                _mm_load_ss(x[j].d.as_ptr().add(b))
            };
            let scale = _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_mul_ps(dw, dx)));
            acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[j]);
            if KIND == 1 {
                let mw = _mm_shuffle_ps::<0b11_01_11_01>(dm, dm);
                let sx = if two {
                    _mm_castpd_ps(_mm_load_sd(x[j].s.as_ptr().add(b) as *const f64))
                } else {
                    _mm_load_ss(x[j].s.as_ptr().add(b))
                };
                acc_min[j] = _mm_fmadd_ps(mw, sx, acc_min[j]);
            }
        }
        b += 2;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        let m = acc_min[j];
        let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
        out[j] = _mm512_reduce_add_ps(acc[j]) + _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
    }
    out
}

/// One panel of `h` ≤ 16 weight rows in the panel layout (`cpu::panel`) against activation rows `xs`:
/// `out[j·h + i] = row i · xs[j]`. Activation rows go in tiles of 8, then 4, then one at a time; each row's
/// operations are the same in every tile size, so results do not depend on how many rows are batched.
fn panel_dot(format: BlockFormat, panel: &[u8], h: usize, xs: &[Q8Panel], out: &mut [f32]) {
    let kind = match format {
        BlockFormat::Q4_0 => 0,
        BlockFormat::Q4_1 => 1,
        BlockFormat::Q8_0 => 2,
    };
    let unit = h * block_bytes(kind);
    assert!((1..=PANEL_ROWS).contains(&h) && panel.len().is_multiple_of(unit) && out.len() == xs.len() * h);
    let nb = panel.len() / unit;
    for x in xs {
        assert!(x.q.d.len() >= nb && x.q.s.len() >= nb && x.corr.len() >= nb && x.q.qs.len() >= nb * QK);
    }
    fn tile<const N: usize>(kind: u8, panel: &[u8], h: usize, nb: usize, x: [&Q8Panel; N], out: &mut [f32]) {
        debug_assert!(out.len() == N * h);
        // SAFETY: `AVX512` (the only table holding `panel_dot`) is selected only when `supported()`; `panel`
        // holds `nb` block columns of `h` rows, every `x` has `nb` scales, sums, corrections and 32·nb codes,
        // and `out` has room for N·h results (asserted above).
        unsafe {
            match kind {
                0 => panel_impl::<0, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
                1 => panel_impl::<1, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
                _ => panel_impl::<2, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
            }
        }
    }
    let mut j = 0;
    while j + 8 <= xs.len() {
        let x: [&Q8Panel; 8] = std::array::from_fn(|i| &xs[j + i]);
        tile(kind, panel, h, nb, x, &mut out[j * h..(j + 8) * h]);
        j += 8;
    }
    if j + 4 <= xs.len() {
        let x: [&Q8Panel; 4] = std::array::from_fn(|i| &xs[j + i]);
        tile(kind, panel, h, nb, x, &mut out[j * h..(j + 4) * h]);
        j += 4;
    }
    while j < xs.len() {
        tile(kind, panel, h, nb, [&xs[j]], &mut out[j * h..(j + 1) * h]);
        j += 1;
    }
}

/// # Safety
/// AVX-512 F/BW/VL/VNNI, F16C; `panel` points to `nb` block columns of `h` ≤ 16 rows in the panel layout; every
/// `x` has `nb` scales, sums and corrections and `32·nb` codes; `out` has room for `N·h` floats.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn panel_impl<const KIND: u8, const N: usize>(
    panel: *const u8,
    h: usize,
    nb: usize,
    x: [&Q8Panel; N],
    out: *mut f32,
) {
    let unit = h * block_bytes(KIND);
    let params = if KIND == 1 { 4 } else { 2 };
    // one weight row per 32-bit lane; a last panel of h < 16 rows leaves the upper lanes zero (masked loads
    // neither read past its end nor add anything, masked stores write only its rows)
    let m: __mmask16 = ((1u32 << h) - 1) as u16;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let u = panel.add(b * unit);
        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, u as *const i16));
        let mw = if KIND == 1 {
            _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, u.add(2 * h) as *const i16))
        } else {
            _mm512_setzero_ps()
        };
        let codes = u.add(params * h);
        // w[k] meets activation word k of the block (Q4: low nibbles of code word k, then the high ones)
        let mut w = [_mm512_setzero_si512(); 8];
        if KIND == 2 {
            for (k, wk) in w.iter_mut().enumerate() {
                *wk = _mm512_maskz_loadu_epi32(m, codes.add(4 * k * h) as *const i32);
            }
        } else {
            for k in 0..4 {
                let v = _mm512_maskz_loadu_epi32(m, codes.add(4 * k * h) as *const i32);
                w[k] = _mm512_and_si512(v, low);
                w[4 + k] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), low);
            }
        }
        for j in 0..N {
            let xq = x[j].q.qs.as_ptr().add(b * QK) as *const i32;
            let mut isum = if KIND == 1 {
                _mm512_setzero_si512()
            } else {
                _mm512_set1_epi32(*x[j].corr.get_unchecked(b))
            };
            for (k, wk) in w.iter().enumerate() {
                isum = _mm512_dpbusd_epi32(isum, *wk, _mm512_set1_epi32(xq.add(k).read_unaligned()));
            }
            let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*x[j].q.d.get_unchecked(b)));
            acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[j]);
            if KIND == 1 {
                acc[j] = _mm512_fmadd_ps(mw, _mm512_set1_ps(*x[j].q.s.get_unchecked(b)), acc[j]);
            }
        }
    }
    for (j, a) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(j * h), m, *a);
    }
}
