//! AVX-512 VNNI: the panel matmul for Q4_0, Q4_1, Q8_0 and Q5_0 weights (`cpu::panel`), chosen over the AVX2 table
//! when the CPU has AVX-512 F/BW/VL and VNNI; with it, block weights are laid out in panels at load, so the row
//! kernels of the table (AVX2's, as is the rest of it) serve only callers that hold GGUF rows. Per block column of
//! a 16-row panel: the rows' f16 scales (and Q4_1 minimums) converted by one `vcvtph2ps`; the code words loaded
//! with one 32-bit lane per row, Q4 nibbles split by one shift and two masks into eight operands; then per
//! activation row eight `vpdpbusd` with the row's code words broadcast from memory (the Q4_0/Q8_0 offsets start the
//! integer sum as `−center·Σq`), one convert, and one FMA with `dw·dx` (Q4_1: one more for `mw·s`). Q5_0 adds its
//! fifth bits to the nibbles: per operand one shift and one mask of the transposed `qh` word and one OR; Q6K32
//! its bit-4 and bit-5 planes the same way, and sums each 16-weight half under its own scale. Sixteen
//! outputs per register, no horizontal sums; each activation row's operations are the same whatever the tile, so
//! batched and single results agree bit for bit.

use super::panel::{Q8Panel, PANEL_ROWS};
use super::{avx2, BlockFormat, Kernels, QK};
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
    dot_q4_0: avx2::AVX2.dot_q4_0,
    dot_q4_1: avx2::AVX2.dot_q4_1,
    dot_q8_0: avx2::AVX2.dot_q8_0,
    dot4_q4_0: avx2::AVX2.dot4_q4_0,
    dot4_q4_1: avx2::AVX2.dot4_q4_1,
    dot4_q8_0: avx2::AVX2.dot4_q8_0,
    dot_f32: avx2::AVX2.dot_f32,
    dot_f16: avx2::AVX2.dot_f16,
    axpy_f16: avx2::AVX2.axpy_f16,
    exp_sum: avx2::AVX2.exp_sum,
    panel_dot: Some(panel_dot),
};

const fn block_bytes(kind: u8) -> usize {
    match kind {
        0 => 18,
        1 => 20,
        3 => 22,
        4 => 28,
        _ => 34,
    }
}

/// One panel of `h` ≤ 16 weight rows in the panel layout (`cpu::panel`) against activation rows `xs`:
/// `out[j·h + i] = row i · xs[j]`. Activation rows go in tiles of 8, then 4, then one at a time; each row's
/// operations are the same in every tile size, so results do not depend on how many rows are batched.
fn panel_dot(format: BlockFormat, panel: &[u8], h: usize, xs: &[Q8Panel], out: &mut [f32]) {
    let kind = match format {
        BlockFormat::Q4_0 => 0,
        BlockFormat::Q4_1 => 1,
        BlockFormat::Q8_0 => 2,
        BlockFormat::Q5_0 => 3,
        BlockFormat::Q6K32 => 4,
    };
    let unit = h * block_bytes(kind);
    assert!((1..=PANEL_ROWS).contains(&h) && panel.len().is_multiple_of(unit) && out.len() == xs.len() * h);
    let nb = panel.len() / unit;
    for x in xs {
        let groups = QK / Q8Panel::group(format);
        assert!(x.q.d.len() >= nb && x.q.s.len() >= nb && x.corr.len() >= nb * groups && x.q.qs.len() >= nb * QK);
    }
    fn tile<const N: usize>(kind: u8, panel: &[u8], h: usize, nb: usize, x: [&Q8Panel; N], out: &mut [f32]) {
        debug_assert!(out.len() == N * h);
        // SAFETY: `AVX512` (the only table holding `panel_dot`) is selected only when `supported()`; `panel` holds
        // `nb` block columns of `h` rows, every `x` has `nb` scales and sums, a correction per group and 32·nb
        // codes, and `out` has room for N·h results (asserted above).
        unsafe {
            match kind {
                0 => panel_impl::<0, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
                1 => panel_impl::<1, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
                3 => panel_impl::<3, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
                4 => panel_impl::<4, N>(panel.as_ptr(), h, nb, x, out.as_mut_ptr()),
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
    let params = if KIND == 1 || KIND == 4 { 4 } else { 2 };
    // one weight row per 32-bit lane; a last panel of h < 16 rows leaves the upper lanes zero (masked loads
    // neither read past its end nor add anything, masked stores write only its rows)
    let m: __mmask16 = ((1u32 << h) - 1) as u16;
    let low = _mm512_set1_epi8(0x0F);
    let mut acc = [_mm512_setzero_ps(); N];
    for b in 0..nb {
        let u = panel.add(b * unit);
        let dw = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, u as *const i16));
        // Q4_1: the minimums; Q6K32: the second half's scales
        let mw = if KIND == 1 || KIND == 4 {
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
        } else if KIND == 3 {
            // word 0: the fifth bits, bit 8j + K for operand K's byte j (`panel::qh_to_panel`)
            let qh = _mm512_maskz_loadu_epi32(m, codes as *const i32);
            let bit4 = _mm512_set1_epi32(0x1010_1010);
            // operand K's fifth bits moved to bit 4 of each byte
            let mut fifth = [
                _mm512_slli_epi32::<4>(qh),
                _mm512_slli_epi32::<3>(qh),
                _mm512_slli_epi32::<2>(qh),
                _mm512_slli_epi32::<1>(qh),
                qh,
                _mm512_srli_epi32::<1>(qh),
                _mm512_srli_epi32::<2>(qh),
                _mm512_srli_epi32::<3>(qh),
            ];
            for f in fifth.iter_mut() {
                *f = _mm512_and_si512(*f, bit4);
            }
            for k in 0..4 {
                let v = _mm512_maskz_loadu_epi32(m, codes.add(4 * (1 + k) * h) as *const i32);
                w[k] = _mm512_or_si512(_mm512_and_si512(v, low), fifth[k]);
                w[4 + k] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v), low), fifth[4 + k]);
            }
        } else if KIND == 4 {
            // words 0, 1: the bit-4 and bit-5 planes, bit 8j + K for operand K's byte j
            let p4 = _mm512_maskz_loadu_epi32(m, codes as *const i32);
            let p5 = _mm512_maskz_loadu_epi32(m, codes.add(4 * h) as *const i32);
            let (bit4, bit5) = (_mm512_set1_epi32(0x1010_1010), _mm512_set1_epi32(0x2020_2020));
            // each plane shifted to its bit and masked apart (a shift moves neighbouring operands' bits too)
            let at4 = [
                _mm512_slli_epi32::<4>(p4),
                _mm512_slli_epi32::<3>(p4),
                _mm512_slli_epi32::<2>(p4),
                _mm512_slli_epi32::<1>(p4),
                p4,
                _mm512_srli_epi32::<1>(p4),
                _mm512_srli_epi32::<2>(p4),
                _mm512_srli_epi32::<3>(p4),
            ];
            let at5 = [
                _mm512_slli_epi32::<5>(p5),
                _mm512_slli_epi32::<4>(p5),
                _mm512_slli_epi32::<3>(p5),
                _mm512_slli_epi32::<2>(p5),
                _mm512_slli_epi32::<1>(p5),
                p5,
                _mm512_srli_epi32::<1>(p5),
                _mm512_srli_epi32::<2>(p5),
            ];
            let mut high = [_mm512_setzero_si512(); 8];
            for (hk, (a4, a5)) in high.iter_mut().zip(at4.iter().zip(&at5)) {
                *hk = _mm512_or_si512(_mm512_and_si512(*a4, bit4), _mm512_and_si512(*a5, bit5));
            }
            for k in 0..4 {
                let v = _mm512_maskz_loadu_epi32(m, codes.add(4 * (2 + k) * h) as *const i32);
                w[k] = _mm512_or_si512(_mm512_and_si512(v, low), high[k]);
                w[4 + k] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16::<4>(v), low), high[4 + k]);
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
            if KIND == 4 {
                // a scale per 16 weights: operands 0–3 and 4–7 summed apart
                let dx = _mm512_set1_ps(*x[j].q.d.get_unchecked(b));
                for (half, dh) in [dw, mw].into_iter().enumerate() {
                    let mut isum = _mm512_set1_epi32(*x[j].corr.get_unchecked(2 * b + half));
                    for (k, wk) in w.iter().enumerate().skip(4 * half).take(4) {
                        isum = _mm512_dpbusd_epi32(isum, *wk, _mm512_set1_epi32(xq.add(k).read_unaligned()));
                    }
                    acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(dh, dx), acc[j]);
                }
                continue;
            }
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
