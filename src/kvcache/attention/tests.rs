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
                    (k.scores)(&rows, head, &q, 0.125, 0, &mut s);
                    let norm_s = want_s.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                    for (a, b) in s.iter().zip(&want_s) {
                        assert!(
                            ((*a as f64) - b).abs() <= 1e-4 * norm_s,
                            "{} {bits:?} g{g} n{n}: score {a} vs {b}",
                            k.name
                        );
                    }
                    let mut acc = vec![0f32; d];
                    (k.accumulate)(&rows, head, &p, 0, &mut acc);
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

/// Every grouped table this CPU can run: the scalar specification, the single-head kernels head by head, and
/// AVX-512 where present (both x86 paths are tested on a machine that has AVX-512).
fn group_tables() -> Vec<&'static group::GroupKernels> {
    #[allow(unused_mut)]
    let mut t: Vec<&'static group::GroupKernels> = vec![&group::SCALAR_GROUP, &group::DETECTED_PER_HEAD];
    #[cfg(target_arch = "x86_64")]
    if avx512::supported() {
        t.push(&avx512::AVX512);
    }
    t
}

#[test]
fn grouped_kernels_equal_attention_over_the_dequantized_rows() {
    use group::{GroupQuery, Span};
    let mut seed = 5;
    let cases = [
        (Bits::B16, OffsetMode::Stored, 64, 64),
        (Bits::B8, OffsetMode::Stored, 64, 64),
        (Bits::B4, OffsetMode::Stored, 64, 64),
        (Bits::B2, OffsetMode::Stored, 64, 64),
        (Bits::B16, OffsetMode::Stored, 128, 128),
        (Bits::B8, OffsetMode::Stored, 128, 128),
        (Bits::B4, OffsetMode::Stored, 128, 128),
        (Bits::B2, OffsetMode::Stored, 128, 128),
        (Bits::B4, OffsetMode::Stored, 256, 256),
        (Bits::B2, OffsetMode::Stored, 256, 256),
        (Bits::B8, OffsetMode::Stored, 256, 256),
        (Bits::B2, OffsetMode::Stored, 64, 128),
        (Bits::B4, OffsetMode::Symmetric { center: 8 }, 32, 64),
        (Bits::B8, OffsetMode::Symmetric { center: 128 }, 32, 64),
    ];
    let kv_heads = 2;
    for (bits, mode, g, d) in cases {
        let n = 41;
        let rows = random_rows(bits, g, kv_heads, d, n, mode, &mut seed);
        for heads in [1usize, 3, 5] {
            let q: Vec<f32> = (0..heads * d).map(|_| lcg(&mut seed)).collect();
            let scale = 1.0 / (d as f32).sqrt();
            let gq = GroupQuery::new(&q, heads, d, scale, g);
            for (t0, len) in [(0usize, n), (3, 17), (20, 21), (40, 1)] {
                let p: Vec<f32> = (0..heads * len).map(|_| lcg(&mut seed).abs()).collect();
                for kvh in 0..kv_heads {
                    let mut tok = vec![0f32; kv_heads * d];
                    let mut want_s = vec![0f64; heads * len];
                    // the error bound of a score: the query rounded to i16 per group moves each product by at
                    // most 2⁻¹⁶·max|q|·|x̂_c|, so scores are held to 1e-4 · max|q| · Σ|x̂| · scale
                    let mut bound_s = vec![0f64; heads * len];
                    let mut want_a = vec![0f64; heads * d];
                    for t in 0..len {
                        rows.dequantize_token(t0 + t, &mut tok);
                        let x = &tok[kvh * d..(kvh + 1) * d];
                        for j in 0..heads {
                            let qj = &q[j * d..(j + 1) * d];
                            want_s[j * len + t] =
                                x.iter().zip(qj).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale as f64;
                            let qmax = qj.iter().fold(0f64, |m, v| m.max(v.abs() as f64));
                            bound_s[j * len + t] =
                                1e-4 * qmax * x.iter().map(|v| v.abs() as f64).sum::<f64>() * scale as f64;
                            for c in 0..d {
                                want_a[j * d + c] += p[j * len + t] as f64 * x[c] as f64;
                            }
                        }
                    }
                    for k in group_tables() {
                        let what = format!(
                            "{} {bits:?} g{g} d{d} heads {heads} span {t0}+{len} kv head {kvh}",
                            k.name
                        );
                        // a stride larger than the span: every write lands in its own head's row
                        let stride = len + 3;
                        let mut s = vec![f32::NAN; heads * stride];
                        (k.scores)(&rows, kvh, &gq, Span { t0, len }, &mut s, stride);
                        for j in 0..heads {
                            for t in 0..len {
                                let (a, b) = (s[j * stride + t] as f64, want_s[j * len + t]);
                                let bound = bound_s[j * len + t];
                                assert!((a - b).abs() <= bound, "{what}: score {a} vs {b} (bound {bound})");
                            }
                            assert!(
                                s[j * stride + len..(j + 1) * stride].iter().all(|v| v.is_nan()),
                                "{what}"
                            );
                        }
                        let mut pp = vec![0f32; heads * stride];
                        for j in 0..heads {
                            pp[j * stride..j * stride + len].copy_from_slice(&p[j * len..(j + 1) * len]);
                        }
                        let mut acc = vec![0.5f32; heads * d];
                        (k.accumulate)(&rows, kvh, &pp, stride, Span { t0, len }, heads, &mut acc);
                        let norm = want_a.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-3);
                        for (a, b) in acc.iter().zip(&want_a) {
                            let a = *a as f64 - 0.5;
                            assert!((a - b).abs() <= 1e-4 * norm, "{what}: acc {a} vs {b}");
                        }
                    }
                }
            }
        }
    }
}

/// The split, grouped layer attention equals the per-head specification (`attend_segments` with the scalar
/// kernels) for decode and prefill calls, with and without fresh tokens, on one thread and on a pool.
#[test]
fn split_layer_attention_equals_the_per_head_specification() {
    use group::{attend_layer, GroupOps, Heads};
    let mut seed = 77;
    let (kv_heads, q_heads, d) = (3usize, 9usize, 64usize);
    let kv_dim = kv_heads * d;
    for (body_bits, body_len) in [(Bits::B2, 1500usize), (Bits::B4, 700), (Bits::B8, 40), (Bits::B16, 900)] {
        let sink = random_rows(Bits::B16, 64, kv_heads, d, 1, OffsetMode::Stored, &mut seed);
        let body = random_rows(body_bits, 64, kv_heads, d, body_len, OffsetMode::Stored, &mut seed);
        let window = random_rows(Bits::B16, 64, kv_heads, d, 77, OffsetMode::Stored, &mut seed);
        let vs = [
            random_rows(Bits::B16, 64, kv_heads, d, 1, OffsetMode::Stored, &mut seed),
            random_rows(body_bits, 64, kv_heads, d, body_len, OffsetMode::Stored, &mut seed),
            random_rows(Bits::B16, 64, kv_heads, d, 77, OffsetMode::Stored, &mut seed),
        ];
        let ks = [&sink, &body, &window];
        let vs = [&vs[0], &vs[1], &vs[2]];
        let stored = 1 + body_len + 77;
        for (n, fresh) in [(1usize, true), (5, true), (3, false)] {
            let q: Vec<f32> = (0..n * q_heads * d).map(|_| lcg(&mut seed) * 3.0).collect();
            let fk: Vec<f32> = (0..n * kv_dim).map(|_| lcg(&mut seed) * 2.0).collect();
            let fv: Vec<f32> = (0..n * kv_dim).map(|_| lcg(&mut seed) * 2.0).collect();
            // with fresh tokens: every stored one, then the call's up to itself; without (llama semantics): the
            // stored prefix up to `stored − n + i + 1`
            let see = |i: usize| {
                if fresh {
                    let f = Fresh {
                        k: &fk,
                        v: &fv,
                        stride: kv_dim,
                        count: i + 1,
                    };
                    (stored, Some(f))
                } else {
                    (stored - n + i + 1, None)
                }
            };
            let mut want = vec![0f32; n * q_heads * d];
            for i in 0..n {
                for h in 0..q_heads {
                    let (visible, f) = see(i);
                    let at = (i * q_heads + h) * d;
                    let scale = 1.0 / (d as f32).sqrt();
                    attend_segments(
                        AttnOps::scalar(),
                        &ks,
                        &vs,
                        visible,
                        f,
                        h / 3,
                        &q[at..at + d],
                        scale,
                        &mut want[at..at + d],
                    );
                }
            }
            let heads = Heads { q_heads, kv_heads, d };
            for threads in [1usize, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let tables = group_tables().into_iter().map(|k| GroupOps {
                    kernels: k,
                    ..GroupOps::detected()
                });
                for ops in tables {
                    let mut got = vec![f32::NAN; n * q_heads * d];
                    pool.install(|| attend_layer(ops, &ks[..], &vs[..], heads, &q, n, see, &mut got));
                    let norm = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-3);
                    for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 2e-4 * norm,
                            "{} {body_bits:?} n{n} fresh {fresh} threads {threads} at {idx}: {a} vs {b}",
                            ops.kernels.name
                        );
                    }
                }
            }
        }
    }
}

/// Grouped attention over f16 rows (the fp16 cache) equals softmax attention computed directly in f64, for every
/// table, on one thread and on a pool, for decode and prefill-style visibility.
#[test]
fn grouped_f16_attention_equals_direct_attention() {
    use group::{attend_layer, F16Rows, GroupOps, Heads};
    let mut seed = 99;
    for (kv_heads, q_heads, d, tokens) in [(3usize, 9usize, 64usize, 1300usize), (2, 6, 128, 300), (1, 2, 48, 40)] {
        let kvd = kv_heads * d;
        let kd: Vec<half::f16> = (0..tokens * kvd)
            .map(|_| half::f16::from_f32(lcg(&mut seed) * 2.0))
            .collect();
        let vd: Vec<half::f16> = (0..tokens * kvd)
            .map(|_| half::f16::from_f32(lcg(&mut seed) * 2.0))
            .collect();
        let n = 3;
        let q: Vec<f32> = (0..n * q_heads * d).map(|_| lcg(&mut seed) * 2.0).collect();
        let see = |i: usize| (tokens - n + i + 1, None);
        let group = q_heads / kv_heads;
        let mut want = vec![0f64; n * q_heads * d];
        for i in 0..n {
            let vis = tokens - n + i + 1;
            for h in 0..q_heads {
                let kvh = h / group;
                let qv = &q[(i * q_heads + h) * d..(i * q_heads + h + 1) * d];
                let s: Vec<f64> = (0..vis)
                    .map(|t| {
                        let row = &kd[(t * kv_heads + kvh) * d..(t * kv_heads + kvh + 1) * d];
                        row.iter().zip(qv).map(|(a, b)| a.to_f64() * *b as f64).sum::<f64>() / (d as f64).sqrt()
                    })
                    .collect();
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|x| (x - mx).exp()).sum();
                for (t, x) in s.iter().enumerate() {
                    let w = (x - mx).exp() / z;
                    let row = &vd[(t * kv_heads + kvh) * d..(t * kv_heads + kvh + 1) * d];
                    for c in 0..d {
                        want[(i * q_heads + h) * d + c] += w * row[c].to_f64();
                    }
                }
            }
        }
        let kr = F16Rows { data: &kd, kv_heads, d };
        let vr = F16Rows { data: &vd, kv_heads, d };
        let heads = Heads { q_heads, kv_heads, d };
        let mut all_ops = vec![GroupOps::scalar(), GroupOps::detected()];
        for k in group_tables() {
            all_ops.push(GroupOps {
                kernels: k,
                ..GroupOps::detected()
            });
        }
        for threads in [1usize, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for &ops in &all_ops {
                let mut got = vec![f32::NAN; n * q_heads * d];
                pool.install(|| attend_layer(ops, &[&kr], &[&vr], heads, &q, n, see, &mut got));
                for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (*a as f64 - b).abs() <= 1e-4,
                        "{} d{d} threads {threads} at {idx}: {a} vs {b}",
                        ops.kernels.name
                    );
                }
            }
        }
    }
}
