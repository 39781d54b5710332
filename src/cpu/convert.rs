//! GGUF block formats rewritten at load into formats our kernels run: Q5_0 into Q8_0 exactly, Q4_K into Q4_1
//! and Q6_K into [`BlockFormat::Q6K32`], each with its per-32 (Q6_K: per-16) scales rounded once to f16.

use super::{BlockFormat, QK};
use half::f16;

/// GGUF Q5_0 blocks (f16 `d`, 32 high bits `qh`, 16 bytes of low nibbles; `x = d·(q − 16)`) rewritten as Q8_0
/// blocks with the same `d` and `q − 16` as the int8: the same values exactly.
pub fn q5_0_to_q8_0(q5: &[u8]) -> Vec<u8> {
    const Q5_BYTES: usize = 22;
    let mut out = Vec::with_capacity(q5.len() / Q5_BYTES * BlockFormat::Q8_0.block_bytes());
    for b in q5.chunks_exact(Q5_BYTES) {
        out.extend_from_slice(&b[..2]);
        out.extend((0..QK).map(|i| (super::scalar::q5_0_code(b, i) - 16) as i8 as u8));
    }
    out
}

/// Bytes of one Q4_K super-block of 256 weights: f16 `d`, f16 `dmin`, 12 bytes of 6-bit scales and minimums,
/// 128 bytes of nibbles.
pub const Q4_K_BYTES: usize = 144;

/// Sub-block `j`'s 6-bit scale and minimum from a Q4_K super-block's 12 packed bytes (ggml's
/// `get_scale_min_k4`).
pub fn q4_k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// GGUF Q4_K super-blocks (`x = d·sc_j·q − dmin·m_j` over eight sub-blocks of 32) as Q4_1 blocks (`x = d'·q + m'`)
/// with the same 4-bit codes and `d' = d·sc_j`, `m' = −dmin·m_j` rounded to f16: a relative change of at most
/// 2⁻¹² in a block's scale and minimum (2⁻²⁵ absolute for a subnormal minimum), a sixteenth of the rounding
/// the Q8 activations already carry. `None` where a scale leaves f16's normal range or a minimum overflows (the
/// caller keeps the exact path for that tensor).
pub fn q4_k_to_q4_1(q4k: &[u8]) -> Option<Vec<u8>> {
    let per = 256 / QK;
    let mut out = Vec::with_capacity(q4k.len() / Q4_K_BYTES * per * BlockFormat::Q4_1.block_bytes());
    for sb in q4k.chunks_exact(Q4_K_BYTES) {
        let d = f16::from_le_bytes([sb[0], sb[1]]).to_f32();
        let dmin = f16::from_le_bytes([sb[2], sb[3]]).to_f32();
        let (scales, qs) = (&sb[4..16], &sb[16..144]);
        for j in 0..per {
            let (sc, m) = q4_k_scale_min(j, scales);
            let (dj, mj) = (d * sc as f32, -dmin * m as f32);
            let (hd, hm) = (f16::from_f32(dj), f16::from_f32(mj));
            // the scale keeps its relative precision (zero or normal); the minimum may be subnormal (absolute
            // error ≤ 2⁻²⁵, far below any weight the scale can express)
            if !(dj == 0.0 || hd.is_normal()) || !hm.is_finite() {
                return None;
            }
            out.extend_from_slice(&hd.to_le_bytes());
            out.extend_from_slice(&hm.to_le_bytes());
            // sub-block j: the low (even j) or high (odd j) nibbles of chunk j/2's 32 bytes
            let chunk = &qs[32 * (j / 2)..32 * (j / 2) + 32];
            let nib = |l: usize| if j % 2 == 0 { chunk[l] & 0x0F } else { chunk[l] >> 4 };
            out.extend((0..16).map(|i| nib(i) | (nib(i + 16) << 4)));
        }
    }
    Some(out)
}

/// Bytes of one Q6_K super-block of 256 weights: 128 bytes of low nibbles `ql`, 64 of high bit pairs `qh`, 16
/// int8 scales (one per 16 weights), f16 `d`.
pub const Q6_K_BYTES: usize = 210;

/// GGUF Q6_K super-blocks (`x = d·sc_k·(q − 32)`, q 6-bit, a scale per 16) as [`BlockFormat::Q6K32`] blocks with
/// the same codes and `d·sc_k` rounded to f16 (at most 2⁻¹² of a scale). `None` where a scale leaves f16's normal
/// range.
pub fn q6_k_to_q6k32(q6k: &[u8]) -> Option<Vec<u8>> {
    let per = 256 / QK;
    let mut out = Vec::with_capacity(q6k.len() / Q6_K_BYTES * per * BlockFormat::Q6K32.block_bytes());
    let mut q = [0u8; 256];
    for sb in q6k.chunks_exact(Q6_K_BYTES) {
        let (ql, qh, sc) = (&sb[..128], &sb[128..192], &sb[192..208]);
        let d = f16::from_le_bytes([sb[208], sb[209]]).to_f32();
        // ggml's dequantize_row_q6_K order: per 128 weights, four runs of 32 from one 64-byte ql half and qh
        for c in 0..2 {
            let (ql, qh) = (&ql[64 * c..64 * c + 64], &qh[32 * c..32 * c + 32]);
            for l in 0..32 {
                let n = 128 * c + l;
                q[n] = (ql[l] & 0x0F) | ((qh[l] & 3) << 4);
                q[n + 32] = (ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4);
                q[n + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                q[n + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        for b in 0..per {
            for half in 0..2 {
                let v = d * (sc[2 * b + half] as i8) as f32;
                let h = f16::from_f32(v);
                if !(v == 0.0 || h.is_normal()) {
                    return None;
                }
                out.extend_from_slice(&h.to_le_bytes());
            }
            let codes = &q[QK * b..QK * b + QK];
            let plane = |bit: u8| {
                let mut p = 0u32;
                for (i, &c) in codes.iter().enumerate() {
                    p |= (((c >> bit) & 1) as u32) << i;
                }
                p
            };
            out.extend_from_slice(&plane(4).to_le_bytes());
            out.extend_from_slice(&plane(5).to_le_bytes());
            out.extend((0..16).map(|i| (codes[i] & 0x0F) | ((codes[i + 16] & 0x0F) << 4)));
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize, seed: &mut u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (*seed >> 56) as u8
            })
            .collect()
    }

    fn candle_dequant(dtype: candle_core::quantized::GgmlDType, raw: &[u8], n: usize) -> Vec<f32> {
        candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, raw, vec![1, n], &candle_core::Device::Cpu)
            .unwrap()
            .dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    #[test]
    fn q5_0_becomes_q8_0_with_the_same_values() {
        // Random Q5_0 blocks (every high-bit pattern), dequantized by candle's ggml port as the reference.
        let mut seed = 3;
        let blocks = 64;
        let mut q5 = Vec::new();
        for _ in 0..blocks {
            q5.extend_from_slice(&f16::from_f32((bytes(1, &mut seed)[0] as f32 - 128.0) / 640.0).to_le_bytes());
            q5.extend(bytes(20, &mut seed));
        }
        let want = candle_dequant(candle_core::quantized::GgmlDType::Q5_0, &q5, blocks * QK);
        let q8 = q5_0_to_q8_0(&q5);
        assert_eq!(q8.len(), blocks * BlockFormat::Q8_0.block_bytes());
        let mut got = vec![0.0; blocks * QK];
        super::super::dequantize_row(BlockFormat::Q8_0, &q8, &mut got);
        assert_eq!(got, want);
        assert!(q8
            .chunks_exact(34)
            .all(|b| b[2..].iter().all(|&v| (-16..=15).contains(&(v as i8)))));
    }

    #[test]
    fn q4_k_becomes_q4_1_within_f16_rounding_of_its_scales() {
        let mut seed = 9;
        let supers = 12;
        let mut q4k = Vec::new();
        for _ in 0..supers {
            let r = bytes(2, &mut seed);
            q4k.extend_from_slice(&f16::from_f32(r[0] as f32 / 9000.0 + 1e-4).to_le_bytes());
            q4k.extend_from_slice(&f16::from_f32(r[1] as f32 / 20000.0).to_le_bytes());
            q4k.extend(bytes(140, &mut seed));
        }
        let n = supers * 256;
        let want = candle_dequant(candle_core::quantized::GgmlDType::Q4K, &q4k, n);
        let q41 = q4_k_to_q4_1(&q4k).expect("normal scales");
        assert_eq!(q41.len(), n / QK * BlockFormat::Q4_1.block_bytes());
        let mut got = vec![0.0; n];
        super::super::dequantize_row(BlockFormat::Q4_1, &q41, &mut got);
        // per weight: |Δ| ≤ 2⁻¹¹·(|d·sc|·15 + |dmin·m|) (each rounded product is within half an f16 ulp)
        for (b, (g, w)) in got.chunks(QK).zip(want.chunks(QK)).enumerate() {
            let d = f16::from_le_bytes([q41[20 * b], q41[20 * b + 1]]).to_f32().abs();
            let m = f16::from_le_bytes([q41[20 * b + 2], q41[20 * b + 3]]).to_f32().abs();
            let tol = (d * 15.0 + m) * 2f32.powi(-11) + 2f32.powi(-24);
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert!((g - w).abs() <= tol, "block {b} weight {i}: {g} vs {w} (tol {tol})");
            }
        }
        // where the products are exact in f16 (d = ½, dmin = ¼), every weight is exact: the codes are kept
        let mut exact = q4k.clone();
        for sb in exact.chunks_exact_mut(Q4_K_BYTES) {
            sb[0..2].copy_from_slice(&f16::from_f32(0.5).to_le_bytes());
            sb[2..4].copy_from_slice(&f16::from_f32(0.25).to_le_bytes());
        }
        let mut got = vec![0.0; n];
        super::super::dequantize_row(BlockFormat::Q4_1, &q4_k_to_q4_1(&exact).unwrap(), &mut got);
        assert_eq!(got, candle_dequant(candle_core::quantized::GgmlDType::Q4K, &exact, n));
        // a scale beyond f16's range is refused, not turned into infinity
        let mut big = q4k[..Q4_K_BYTES].to_vec();
        big[0..2].copy_from_slice(&f16::from_f32(30000.0).to_le_bytes());
        big[4] = 63;
        assert!(q4_k_to_q4_1(&big).is_none());
    }

    #[test]
    fn q6_k_becomes_q6k32_within_f16_rounding_of_its_scales() {
        let mut seed = 17;
        let supers = 12;
        let mut q6k = Vec::new();
        for _ in 0..supers {
            q6k.extend(bytes(208, &mut seed));
            let r = bytes(1, &mut seed);
            q6k.extend_from_slice(&f16::from_f32(r[0] as f32 / 60000.0 + 2e-4).to_le_bytes());
        }
        let n = supers * 256;
        let want = candle_dequant(candle_core::quantized::GgmlDType::Q6K, &q6k, n);
        let ours = q6_k_to_q6k32(&q6k).expect("normal scales");
        assert_eq!(ours.len(), n / QK * BlockFormat::Q6K32.block_bytes());
        let mut got = vec![0.0; n];
        super::super::dequantize_row(BlockFormat::Q6K32, &ours, &mut got);
        for (b, (g, w)) in got.chunks(QK).zip(want.chunks(QK)).enumerate() {
            let blk = &ours[28 * b..28 * b + 28];
            let d = |at: usize| f16::from_le_bytes([blk[at], blk[at + 1]]).to_f32().abs();
            let tol = d(0).max(d(2)) * 32.0 * 2f32.powi(-11) + 2f32.powi(-24);
            for (i, (g, w)) in g.iter().zip(w).enumerate() {
                assert!((g - w).abs() <= tol, "block {b} weight {i}: {g} vs {w} (tol {tol})");
            }
        }
        // with d = 2⁻⁸ every product is exact in f16: the codes and their order are kept exactly
        let mut exact = q6k.clone();
        for sb in exact.chunks_exact_mut(Q6_K_BYTES) {
            sb[208..210].copy_from_slice(&f16::from_f32(1.0 / 256.0).to_le_bytes());
        }
        super::super::dequantize_row(BlockFormat::Q6K32, &q6_k_to_q6k32(&exact).unwrap(), &mut got);
        assert_eq!(got, candle_dequant(candle_core::quantized::GgmlDType::Q6K, &exact, n));
    }
}
