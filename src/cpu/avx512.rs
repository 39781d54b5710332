//! AVX-512 VNNI dot products of quantized weight rows with 8-bit activation rows (Q4_0, Q4_1, Q8_0), chosen
//! over the AVX2 table when the CPU has AVX-512 F/BW/VL and VNNI; the rest of the table is AVX2's.
//!
//! Two blocks (64 weights) go through one `vpdpbusd` (64 u8 × s8 products into 16 i32 lanes, 8 per block):
//! a Q4 block's 16 bytes are broadcast to two 128-bit lanes and shifted by 0 and 4 (`vpsrlvw`) so low and high
//! nibbles land in the activations' order with no shuffle; signed weights or the Q4_0 offset are handled exactly
//! in integers (`(w+128)·a − 128·Σa`, `n·a − 8·Σa`). Block scales are not converted one by one: a pre-pass per
//! 16 blocks collects the weights' f16 scales (and Q4_1 minimums), converts them together
//! and multiplies them with the activations' scales, and the loop picks each pair's scales with one permute.
//! The 4-row form unpacks each weight pair once for four activation rows; per row its operations and their
//! order are exactly the 1-row form's, so batched and single results agree bit for bit.

use super::{avx2, Kernels, Q8Row, QK};
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

/// Blocks whose scales one pre-pass prepares (kept on the stack).
const CHUNK: usize = 256;

/// # Safety
/// AVX-512 F/BW/VL/VNNI, AVX2, FMA, F16C; `row` holds `nb` whole blocks; every `x` has `nb` scales (and sums
/// for Q4_1) and `32·nb` codes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot_impl<const KIND: u8, const N: usize>(row: &[u8], nb: usize, x: [&Q8Row; N]) -> [f32; N] {
    let bb = block_bytes(KIND);
    let base = row.as_ptr();
    let mut acc = [_mm512_setzero_ps(); N];
    let mut acc_min = [_mm512_setzero_ps(); N];
    // per chunk: dd[j][b] = d_w[b]·d_x[j][b]; every entry the main loop reads is written by the chunk's
    // pre-pass first (whole 16-lane stores), so the buffer needs no zeroing
    let mut dd = [[std::mem::MaybeUninit::<f32>::uninit(); CHUNK]; N];
    let lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
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
    let mut c0 = 0;
    while c0 < nb {
        let cn = (nb - c0).min(CHUNK);
        // pre-pass: the weights' scales (and minimums), 16 blocks per gather
        let mut b = 0;
        while b < cn {
            let n = (cn - b).min(16);
            let m: __mmask16 = if n == 16 { 0xFFFF } else { (1u16 << n) - 1 };
            // the f16 scale (and Q4_1 minimum) opening each block, as one u32 per block
            let mut words = [0u32; 16];
            for (u, w) in words.iter_mut().enumerate().take(n) {
                *w = (base.add((c0 + b + u) * bb) as *const u32).read_unaligned();
            }
            let g = _mm512_loadu_si512(words.as_ptr() as *const _);
            let dw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g));
            for j in 0..N {
                let dx = _mm512_maskz_loadu_ps(m, x[j].d.as_ptr().add(c0 + b));
                _mm512_storeu_ps(dd[j].as_mut_ptr().add(b) as *mut f32, _mm512_mul_ps(dw, dx));
                if KIND == 1 {
                    let mw = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(g)));
                    let sx = _mm512_maskz_loadu_ps(m, x[j].s.as_ptr().add(c0 + b));
                    acc_min[j] = _mm512_fmadd_ps(mw, sx, acc_min[j]);
                }
            }
            b += 16;
        }
        // main loop: two blocks per step (a lone last block with its partner's half masked off)
        let mut b = 0;
        while b < cn {
            let two = b + 1 < cn;
            let kmask: __mmask64 = if two { u64::MAX } else { 0xFFFF_FFFF };
            let blk = base.add((c0 + b) * bb);
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
            let pick = _mm512_add_epi32(_mm512_srli_epi32::<3>(lane), _mm512_set1_epi32(b as i32 % 16));
            for j in 0..N {
                let a = _mm512_maskz_loadu_epi8(kmask, x[j].qs.as_ptr().add((c0 + b) * QK));
                let mut s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, a);
                match KIND {
                    0 => s = _mm512_sub_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), eight, a)),
                    2 => s = _mm512_sub_epi32(s, _mm512_dpbusd_epi32(_mm512_setzero_si512(), bias, a)),
                    _ => {}
                }
                let d16 = _mm512_loadu_ps(dd[j].as_ptr().add(b - b % 16) as *const f32);
                let scale = _mm512_permutexvar_ps(pick, d16);
                acc[j] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(s), acc[j]);
            }
            b += 2;
        }
        c0 += cn;
    }
    let mut out = [0f32; N];
    for j in 0..N {
        out[j] = _mm512_reduce_add_ps(acc[j]) + _mm512_reduce_add_ps(acc_min[j]);
    }
    out
}
