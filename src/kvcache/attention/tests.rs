//! The fused attention kernels (scalar and this CPU's SIMD) against attention over the dequantized rows.

use super::*;
use crate::kvcache::quant::{Bits, OffsetMode};

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn random_rows(bits: Bits, g: usize, heads: usize, d: usize, n: usize, mode: OffsetMode, seed: &mut u64) -> PackedRows {
    let mut r = PackedRows::new(bits, g, heads, d, mode);
    for _ in 0..n {
        let x: Vec<f32> = (0..heads * d).map(|_| lcg(seed) * 2.0 + 0.3).collect();
        match mode {
            OffsetMode::Stored => r.push_token(&x),
            OffsetMode::Symmetric { .. } => r.push_token_symmetric(&x),
        }
    }
    r
}

#[test]
fn fused_kernels_equal_attention_over_the_dequantized_rows() {
    let mut seed = 21;
    let cases = [
        (Bits::B16, OffsetMode::Stored, 64),
        (Bits::B8, OffsetMode::Stored, 64),
        (Bits::B4, OffsetMode::Stored, 64),
        (Bits::B2, OffsetMode::Stored, 64),
        (Bits::B2, OffsetMode::Stored, 128),
        (Bits::B4, OffsetMode::Stored, 32),
        (Bits::B4, OffsetMode::Stored, 16),
        (Bits::B8, OffsetMode::Symmetric { center: 128 }, 32),
        (Bits::B4, OffsetMode::Symmetric { center: 8 }, 32),
    ];
    let (heads, d) = (3, 128);
    for (bits, mode, g) in cases {
        for n in [1usize, 7, 33] {
            let rows = random_rows(bits, g, heads, d, n, mode, &mut seed);
            let q: Vec<f32> = (0..d).map(|_| lcg(&mut seed)).collect();
            let p: Vec<f32> = (0..n).map(|_| lcg(&mut seed).abs()).collect();
            for head in [0usize, 2] {
                // reference: dequantize, then plain dot products in f64
                let mut want_s = vec![0f64; n];
                let mut want_a = vec![0f64; d];
                let mut tok = vec![0f32; heads * d];
                for t in 0..n {
                    rows.dequantize_token(t, &mut tok);
                    let kv = &tok[head * d..(head + 1) * d];
                    want_s[t] = kv.iter().zip(&q).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * 0.125;
                    for c in 0..d {
                        want_a[c] += p[t] as f64 * kv[c] as f64;
                    }
                }
                let kernels: Vec<&AttnKernels> = vec![&SCALAR, attn_kernels()];
                for k in kernels {
                    let mut s = vec![0f32; n];
                    (k.scores)(&rows, head, &q, 0.125, &mut s);
                    let norm_s = want_s.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                    for (a, b) in s.iter().zip(&want_s) {
                        assert!(
                            ((*a as f64) - b).abs() <= 1e-4 * norm_s,
                            "{} {bits:?} g{g} n{n}: score {a} vs {b}",
                            k.name
                        );
                    }
                    let mut acc = vec![0f32; d];
                    (k.accumulate)(&rows, head, &p, &mut acc);
                    let norm_a = want_a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                    for (a, b) in acc.iter().zip(&want_a) {
                        assert!(
                            ((*a as f64) - b).abs() <= 1e-4 * norm_a,
                            "{} {bits:?} g{g} n{n}: acc {a} vs {b}",
                            k.name
                        );
                    }
                }
            }
        }
    }
}
