//! Spec §10 items 1–3 (quantizer, packing, ERS) and shrinking packed rows.

use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

const ALL: [Bits; 4] = [Bits::B16, Bits::B8, Bits::B4, Bits::B2];

#[test]
fn quantizer_error_is_within_half_a_step_and_extremes_map_to_the_ends() {
    let mut seed = 5;
    for bits in ALL {
        for _ in 0..200 {
            let x: Vec<f32> = (0..64).map(|_| lcg(&mut seed) * 3.0).collect();
            let mut codes = vec![0u16; 64];
            let p = quantize_group(&x, bits, &mut codes);
            let (imin, imax) = (
                x.iter().enumerate().min_by(|a, b| a.1.total_cmp(b.1)).unwrap().0,
                x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0,
            );
            assert_eq!(codes[imin], 0);
            assert_eq!(codes[imax] as u32, bits.max_code());
            for (&v, &c) in x.iter().zip(&codes) {
                let xh = c as f32 * p.scale + p.offset;
                assert!(
                    (v - xh).abs() <= p.scale / 2.0 * (1.0 + 1e-4) + 1e-6,
                    "{bits:?}: {v} vs {xh}"
                );
            }
        }
    }
}

#[test]
fn constant_groups_are_exact_and_ties_round_half_to_even() {
    let mut codes = vec![0u16; 4];
    let p = quantize_group(&[0.7; 4], Bits::B2, &mut codes);
    assert_eq!((p.scale, p.offset, codes.clone()), (0.0, 0.7, vec![0, 0, 0, 0]));
    // spec §2.2: x = [-1, 0, 0.5, 2] at 2 bits: S = 1, Z = 1, (x+Z)/S = [0, 1, 1.5, 3] -> [0, 2, 2, 3]
    let p = quantize_group(&[-1.0, 0.0, 0.5, 2.0], Bits::B2, &mut codes);
    assert_eq!((p.scale, p.offset), (1.0, -1.0));
    assert_eq!(codes, vec![0, 1, 2, 3]);
    // a tie at 0.5 goes down to the even 0, a tie at 2.5 to 2
    let p = quantize_group(&[0.0, 0.5, 2.5, 3.0], Bits::B2, &mut codes);
    assert_eq!(p.scale, 1.0);
    assert_eq!(codes, vec![0, 0, 2, 3]);
}

#[test]
fn packing_round_trips_and_matches_the_documented_layout() {
    let mut out = vec![0u8; 4];
    pack(&[1, 2, 3, 4, 5, 6, 7, 8], Bits::B4, &mut out);
    assert_eq!(out, vec![0x51, 0x62, 0x73, 0x84]);
    let mut out2 = vec![0u8; 2];
    pack(&[3, 0, 1, 2, 3, 3, 0, 1], Bits::B2, &mut out2);
    assert_eq!(out2, vec![0x37, 0x78]);
    let mut out8 = vec![0u8; 2];
    pack(&[0xAB, 0xCD], Bits::B8, &mut out8);
    assert_eq!(out8, vec![0xAB, 0xCD]);
    let mut out16 = vec![0u8; 2];
    pack(&[0xABCD], Bits::B16, &mut out16);
    assert_eq!(out16, vec![0xCD, 0xAB]);
    let mut seed = 9;
    for bits in ALL {
        for g in [4usize, 32, 64, 128] {
            let codes: Vec<u16> = (0..g)
                .map(|_| ((lcg(&mut seed).abs() * 70000.0) as u32 % (bits.max_code() + 1)) as u16)
                .collect();
            let mut packed = vec![0u8; bits.group_bytes(g)];
            pack(&codes, bits, &mut packed);
            let mut back = vec![0u16; g];
            unpack(&packed, bits, &mut back);
            assert_eq!(back, codes, "{bits:?} g={g}");
        }
    }
}

/// round(q/d) for odd d, exactly (no ties exist).
fn round_div(q: u32, d: u32) -> u32 {
    (2 * q + d) / (2 * d)
}

#[test]
fn ers_equals_rounded_division_for_every_code_and_chains_nest() {
    for n in [8u32, 4, 2] {
        for q in 0..(1u32 << (2 * n)) {
            let got = ers(q, n);
            assert_eq!(got, round_div(q, (1 << n) + 1), "n={n} q={q}");
            assert!(got < (1 << n));
        }
    }
    for q in 0..65536u32 {
        assert_eq!(ers(ers(q, 8), 4), round_div(q, 4369), "16→8→4 q={q}");
        assert_eq!(ers(ers(ers(q, 8), 4), 2), round_div(q, 21845), "16→2 q={q}");
    }
    for q in 0..256u32 {
        assert_eq!(ers(ers(q, 4), 2), round_div(q, 85));
    }
    // spec §3.6 tables
    let t42: Vec<u32> = (0..16).map(|q| ers(q, 2)).collect();
    assert_eq!(t42, vec![0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]);
    let direct: Vec<u32> = (0..16).map(|q| shift_code(q, 2, ShiftMode::Direct)).collect();
    assert_eq!(direct, vec![0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
    for (q, want) in [
        (8, 0),
        (9, 1),
        (25, 1),
        (26, 2),
        (42, 2),
        (43, 3),
        (127, 7),
        (128, 8),
        (255, 15),
    ] {
        assert_eq!(ers(q, 4), want);
    }
    for (q, want) in [
        (128, 0),
        (129, 1),
        (385, 1),
        (386, 2),
        (32767, 127),
        (32768, 128),
        (65535, 255),
    ] {
        assert_eq!(ers(q, 8), want);
    }
}

#[test]
fn quantize_at_16_then_shrink_equals_quantize_directly() {
    let mut seed = 77;
    for target in [Bits::B8, Bits::B4, Bits::B2] {
        let (mut same, mut total) = (0usize, 0usize);
        for _ in 0..2000 {
            let x: Vec<f32> = (0..64).map(|_| lcg(&mut seed) * 4.0).collect();
            let (mut c16, mut cb) = (vec![0u16; 64], vec![0u16; 64]);
            quantize_group(&x, Bits::B16, &mut c16);
            quantize_group(&x, target, &mut cb);
            let mut cur = c16.iter().map(|&c| c as u32).collect::<Vec<_>>();
            let mut bits = Bits::B16;
            while bits > target {
                let lower = bits.halved().unwrap();
                cur.iter_mut().for_each(|c| *c = ers(*c, lower.count()));
                bits = lower;
            }
            same += cur.iter().zip(&cb).filter(|(a, b)| **a == **b as u32).count();
            total += 64;
        }
        let share = same as f64 / total as f64;
        assert!(share >= 0.9999, "{target:?}: {share}");
    }
}

#[test]
fn modified_shift_moves_the_offset_to_the_bucket_mean() {
    let p = shift_params(
        GroupParams {
            scale: 1.0,
            offset: 0.0,
        },
        2,
        ShiftMode::Modified,
    );
    assert_eq!((p.scale, p.offset), (4.0, 1.5));
    let p = shift_params(
        GroupParams {
            scale: 1.0,
            offset: 0.0,
        },
        2,
        ShiftMode::Equivalent,
    );
    assert_eq!((p.scale, p.offset), (5.0, 0.0));
}

#[test]
fn shrinking_rows_matches_requantizing_the_original_values() {
    let mut seed = 3;
    let x: Vec<Vec<f32>> = (0..20)
        .map(|_| (0..128).map(|_| lcg(&mut seed) * 5.0).collect())
        .collect();
    let mut r16 = PackedRows::new(Bits::B16, 64, 2, 64, OffsetMode::Stored);
    let mut r2 = PackedRows::new(Bits::B2, 64, 2, 64, OffsetMode::Stored);
    for t in &x {
        r16.push_token(t);
        r2.push_token(t);
    }
    r16.shrink_to(Bits::B2, ShiftMode::Equivalent);
    assert_eq!(r16.bits, Bits::B2);
    let (mut a, mut b) = (vec![0f32; 128], vec![0f32; 128]);
    for t in 0..20 {
        r16.dequantize_token(t, &mut a);
        r2.dequantize_token(t, &mut b);
        for (u, v) in a.iter().zip(&b) {
            // codes agree (≥ 99.99%); params differ only by f16 storage of the 16-bit scale
            assert!((u - v).abs() <= 0.02 * 10.0 / 3.0, "{u} vs {v}");
        }
    }
    assert_eq!(r16.true_bytes(), r2.true_bytes());
    assert!(!r16.clone().shrink(ShiftMode::Equivalent), "2 bits is the floor");
}

/// The old one-level-at-a-time shrink, kept here as the specification: unpack, shift every code with
/// `shift_code`, update the stored parameters, pack; repeated per level.
fn shrink_chain(r: &PackedRows, bits: Bits, mode: ShiftMode) -> PackedRows {
    let mut cur = r.clone();
    while cur.bits > bits {
        let lower = cur.bits.halved().unwrap();
        let n = lower.count();
        let mut out = cur.empty_like(lower);
        let mut codes = vec![0u16; cur.group];
        for gi in 0..cur.scale.len() {
            let (bytes, s, m) = cur.group_at(gi);
            unpack(bytes, cur.bits, &mut codes);
            let values: Vec<f32> = codes.iter().map(|&c| c as f32 * s + m).collect();
            for c in codes.iter_mut() {
                *c = shift_code(*c as u32, n, mode) as u16;
            }
            let mut p = shift_params(GroupParams { scale: s, offset: m }, n, mode);
            if mode.fits_at(lower) && cur.offset_mode == OffsetMode::Stored && s > 0.0 {
                let start = GroupParams {
                    scale: store_param(p.scale).to_f32(),
                    offset: store_param(p.offset).to_f32(),
                };
                p = fit_group(&values, lower, start, &mut codes);
            }
            let start = out.data.len();
            out.data.resize(start + out.group_bytes(), 0);
            pack(&codes, lower, &mut out.data[start..]);
            out.scale.push(store_param(p.scale));
            if cur.offset_mode == OffsetMode::Stored {
                out.offset.push(store_param(p.offset));
            }
        }
        cur = out;
    }
    cur
}

#[test]
fn one_pass_shrink_equals_the_level_by_level_chain_bit_for_bit() {
    let mut seed = 17;
    for mode in [
        ShiftMode::Equivalent,
        ShiftMode::Direct,
        ShiftMode::Modified,
        ShiftMode::Fitted,
    ] {
        for (from, offsets) in [
            (Bits::B16, OffsetMode::Stored),
            (Bits::B8, OffsetMode::Stored),
            (Bits::B8, OffsetMode::Symmetric { center: 128 }),
        ] {
            let mut r = PackedRows::new(from, 32, 2, 64, offsets);
            for _ in 0..37 {
                let x: Vec<f32> = (0..128).map(|_| lcg(&mut seed) * 7.0 - 1.0).collect();
                match offsets {
                    OffsetMode::Stored => r.push_token(&x),
                    OffsetMode::Symmetric { .. } => r.push_token_symmetric(&x),
                }
            }
            for to in [Bits::B8, Bits::B4, Bits::B2] {
                if to >= from {
                    continue;
                }
                let want = shrink_chain(&r, to, mode);
                let mut got = r.clone();
                let levels = got.shrink_to(to, mode);
                assert_eq!(
                    levels,
                    from.count().ilog2() - to.count().ilog2(),
                    "{mode:?} {from:?}→{to:?}"
                );
                assert_eq!(got.bits, want.bits);
                assert_eq!(got.data, want.data, "{mode:?} {from:?}→{to:?} codes");
                assert_eq!(got.scale, want.scale, "{mode:?} {from:?}→{to:?} scales");
                assert_eq!(got.offset, want.offset, "{mode:?} {from:?}→{to:?} offsets");
            }
        }
    }
}

/// Standard normal samples (Box–Muller over the LCG): what a rotated head's values look like.
fn gaussian(seed: &mut u64, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let u = (lcg(seed) * 0.5 + 0.5).max(1e-7);
            let v = lcg(seed) * 0.5 + 0.5;
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn squared_error(x: &[f32], codes: &[u16], p: GroupParams) -> f64 {
    x.iter()
        .zip(codes)
        .map(|(&v, &c)| ((c as f32 * p.scale + p.offset - v) as f64).powi(2))
        .sum()
}

#[test]
fn fitted_floor_never_loses_to_the_shift_and_halves_gaussian_error() {
    // each group goes 16 → 4 by ERS, then to 2 bits either by ERS or by the fit; both are scored against the
    // original values
    let mut seed = 23;
    let (mut ers_err, mut fit_err) = (0.0f64, 0.0f64);
    for round in 0..400 {
        let mut x = gaussian(&mut seed, 64);
        if round % 4 == 0 {
            x[round % 64] *= 6.0; // an outlier now and then
        }
        let mut r = PackedRows::new(Bits::B16, 64, 1, 64, OffsetMode::Stored);
        r.push_token(&x);
        r.shrink_to(Bits::B4, ShiftMode::Equivalent);
        let (mut e, mut f) = (r.clone(), r.clone());
        e.shrink_to(Bits::B2, ShiftMode::Equivalent);
        f.shrink_to(Bits::B2, ShiftMode::Fitted);
        let (mut a, mut b) = (vec![0f32; 64], vec![0f32; 64]);
        e.dequantize_token(0, &mut a);
        f.dequantize_token(0, &mut b);
        let err = |y: &[f32]| x.iter().zip(y).map(|(u, v)| ((u - v) as f64).powi(2)).sum::<f64>();
        // against the 4-bit values it was fitted to, the fit is never worse; against the originals allow the
        // 4-bit rounding between them
        let mut four = vec![0f32; 64];
        r.dequantize_token(0, &mut four);
        let (e4, f4) = (
            four.iter().zip(&a).map(|(u, v)| ((u - v) as f64).powi(2)).sum::<f64>(),
            four.iter().zip(&b).map(|(u, v)| ((u - v) as f64).powi(2)).sum::<f64>(),
        );
        assert!(f4 <= e4 * (1.0 + 1e-6) + 1e-9, "round {round}: fit {f4} > shift {e4}");
        ers_err += err(&a);
        fit_err += err(&b);
    }
    let ratio = fit_err / ers_err;
    eprintln!("2-bit squared error, fitted / shifted: {ratio:.3}");
    assert!(
        ratio < 0.75,
        "the fit should cut Gaussian 2-bit error well below min/max's: {ratio}"
    );
}

#[test]
fn fit_keeps_constant_and_two_valued_groups_exact() {
    let mut codes = vec![0u16; 8];
    let x = [1.0f32, 3.0, 1.0, 3.0, 3.0, 1.0, 1.0, 3.0];
    let start = GroupParams {
        scale: 2.0 / 3.0,
        offset: 1.0,
    };
    let p = fit_group(&x, Bits::B2, start, &mut codes);
    assert_eq!(squared_error(&x, &codes, p), 0.0, "{p:?} {codes:?}");
    // shrinking a constant group keeps it exact (scale 0 is never fitted)
    let mut r = PackedRows::new(Bits::B16, 8, 1, 8, OffsetMode::Stored);
    r.push_token(&[0.25; 8]);
    r.shrink_to(Bits::B2, ShiftMode::Fitted);
    let mut y = vec![0f32; 8];
    r.dequantize_token(0, &mut y);
    assert_eq!(y, vec![0.25; 8]);
}
