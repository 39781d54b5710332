//! The elastic window (issue 15): at the floor the 16-bit window yields its oldest tokens to the body instead of
//! the sequence ending, so the floor is the sink plus every other token at the floor width; above it nothing
//! changes. And the window at 8 bits: half the bytes, the same body.

use super::tests::run_cut;
use super::*;
use crate::kvcache::quant::ShiftMode;
use std::sync::Arc;

/// SmolLM2's cache shape: 30 layers, 3 KV heads of 64.
pub(super) fn smol() -> KvGeometry {
    KvGeometry {
        layers: 30,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    }
}

pub(super) fn token(seed: u64, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|c| (((seed * 7919 + c as u64 * 104729) % 1000) as f32 / 500.0) - 1.0 + (seed % 7) as f32 * 0.01)
        .collect()
}

fn elastic() -> PmkvqConfig {
    PmkvqConfig {
        elastic_window: true,
        shift: ShiftMode::Fitted,
        ..PmkvqConfig::pmkvq()
    }
}

/// Calibration-shaped sensitivity: keys more sensitive than values, a few layers much more.
fn sensitivity(layers: usize) -> Arc<Sensitivity> {
    let row = |f: f64| [0.0, 1e-4 * f, 1e-2 * f, f];
    Arc::new(Sensitivity {
        k: (0..layers).map(|l| row(if l % 5 == 1 { 8.0 } else { 2.0 })).collect(),
        v: (0..layers).map(|l| row(if l % 7 == 3 { 3.0 } else { 1.0 })).collect(),
    })
}

#[test]
fn the_elastic_floor_is_the_sink_at_16_bits_and_every_other_token_at_2_bits() {
    let g = smol();
    // one token of one side: 192 values; 16 bits: 384 bytes of codes + 3 groups × (scale, offset) = 396; 2 bits:
    // 48 + 12 = 60
    for t in [1usize, 2, 100, 1000, 4096] {
        let expect = 30 * (2 * (396 + (t - 1) * 60) + LAYER_BOOKKEEPING);
        assert_eq!(PmkvqStore::floor_bytes(g, &elastic(), t), expect, "{t} tokens");
    }
    // the full-window floor of a length whose window is full (1 + 7·128 + 127): 127 tokens at 16 bits more
    let t = 1024;
    assert_eq!(
        PmkvqStore::floor_bytes(g, &PmkvqConfig::pmkvq(), t) - PmkvqStore::floor_bytes(g, &elastic(), t),
        30 * 2 * 127 * (396 - 60)
    );
}

/// Two layers of two 32-wide KV heads: small enough to check every token.
pub(super) fn tiny() -> KvGeometry {
    KvGeometry {
        layers: 2,
        q_heads: 2,
        kv_heads: 2,
        head_dim: 32,
    }
}

/// A [`tiny`] store fed `toks` one at a time under `total` true bytes, as the engine sets it before each step;
/// never over it after a step.
fn run_budgeted(cfg: PmkvqConfig, total: usize, toks: &[Vec<f32>]) -> PmkvqStore {
    let mut s = PmkvqStore::new(tiny(), cfg, &[usize::MAX; 2], 4096).unwrap();
    for x in toks {
        s.set_total_budget(total, None, 1).unwrap();
        s.reserve(1).unwrap();
        for li in 0..2 {
            s.append(li, x, x, 1).unwrap();
        }
        assert!(s.true_bytes() <= total, "{} > {total}", s.true_bytes());
    }
    s
}

/// The engine's loop under a budget cut (issue 15 item 6) with the elastic window: planned or split by shares,
/// the sequence runs while the sink and floor bodies fit, far past where the full window stopped it, and the
/// cache is within the budget after every step.
#[test]
fn a_cut_budget_holds_the_sequence_until_the_sink_and_floor_bodies_no_longer_fit() {
    let g = smol();
    let (before, after, cut_at) = (25_300_000usize, 8_850_000usize, 1100usize);
    let last_fit = |cfg: &PmkvqConfig| {
        (0..8192)
            .take_while(|&t| PmkvqStore::floor_bytes(g, cfg, t) <= after)
            .last()
            .unwrap()
    };
    let (full, yielding) = (last_fit(&PmkvqConfig::pmkvq()), last_fit(&elastic()));
    assert!(yielding > full + 300, "{yielding} vs {full}");
    let shares: Vec<f64> = (0..30).map(|l| if l % 4 == 1 { 2.0 } else { 1.0 }).collect();
    let planned = PmkvqConfig {
        sensitivity: Some(sensitivity(30)),
        ..elastic()
    };
    for (cfg, shares) in [(elastic(), None), (elastic(), Some(&shares[..])), (planned, None)] {
        let mut s = PmkvqStore::new(g, cfg.clone(), &[usize::MAX; 30], 8192).unwrap();
        let mut yielded = false;
        let x = |i: usize| token(i as u64, g.kv_dim());
        let ended = run_cut(&mut s, (before, after, cut_at), shares, x, |s, stored| {
            let k = &s.layers[0].k;
            yielded |= k.window.len() < (stored - 1) % 128 && k.body.bits == Bits::B2;
        });
        assert!(yielded, "{}: the window never yielded", cfg.name);
        assert!(
            ended.0 + 1 >= yielding && ended.0 <= yielding,
            "planned {} shares {}: ended at {} ({}), the elastic floor fits {yielding} tokens",
            cfg.plans_widths(),
            shares.is_some(),
            ended.0,
            ended.1
        );
    }
}

/// A budget that holds the full window at the floor never makes it yield: the elastic store is bit for bit the
/// store without it. Below that, the window keeps the most recent tokens at 16 bits and the yielded ones are in
/// the body exactly as a regular flush would have put them there.
#[test]
fn the_window_yields_only_below_the_full_window_floor_and_keeps_the_newest_tokens() {
    let g = tiny();
    let n = 700;
    let toks: Vec<Vec<f32>> = (0..n as u64).map(|i| token(i, g.kv_dim())).collect();
    let run = |cfg: PmkvqConfig, total: usize| run_budgeted(cfg, total, &toks);
    let regular = PmkvqConfig {
        shift: ShiftMode::Fitted,
        ..PmkvqConfig::pmkvq()
    };
    let full = PmkvqStore::floor_bytes(g, &regular, n);
    let a = run(regular, full);
    let b = run(elastic(), full);
    assert_eq!(
        a.spill().unwrap(),
        b.spill().unwrap(),
        "identical at the full-window floor"
    );

    let tight = (PmkvqStore::floor_bytes(g, &elastic(), n) + full) / 2;
    let s = run(elastic(), tight);
    for l in &s.layers {
        for side in [&l.k, &l.v] {
            let (ns, nb, nw) = (side.sink.len(), side.body.len(), side.window.len());
            assert_eq!(ns + nb + nw, n);
            assert!(nw < 127 && nw > 0, "window {nw}");
            assert_eq!(side.body.bits, Bits::B2);
            // each token as a lone 16-bit row, and lowered to the floor as any flush lowers it
            let mut got = vec![0f32; g.kv_dim()];
            for (t, x) in toks.iter().enumerate().skip(ns) {
                let mut want = side.window.empty_like(Bits::B16);
                want.push_token(x);
                let (seg, at) = if t < ns + nb {
                    want.shrink_to(Bits::B2, ShiftMode::Fitted);
                    (&side.body, t - ns)
                } else {
                    (&side.window, t - ns - nb)
                };
                let mut w = vec![0f32; g.kv_dim()];
                want.dequantize_token(0, &mut w);
                seg.dequantize_token(at, &mut got);
                assert_eq!(got, w, "token {t} (body {nb}, window {nw})");
            }
        }
    }
}

/// An 8-bit window costs what the formula says (204 bytes a token and side on SmolLM2's shape against 396), its
/// body starts at 8 bits, and under a budget it holds exactly what the 16-bit window's store holds once tokens
/// leave the window (quantizing at 8 bits equals quantizing at 16 and shifting once), in half the window bytes.
#[test]
fn an_8_bit_window_costs_half_and_its_flushes_equal_the_16_bit_windows() {
    let eight = |cfg: PmkvqConfig| PmkvqConfig {
        window_bits: Bits::B8,
        ..cfg
    };
    let t = 1 + 7 * 128 + 127; // a full window's worth in it
    let floor16 = PmkvqStore::floor_bytes(smol(), &PmkvqConfig::pmkvq(), t);
    let floor8 = PmkvqStore::floor_bytes(smol(), &eight(PmkvqConfig::pmkvq()), t);
    assert_eq!(floor16 - floor8, 30 * 2 * 127 * (396 - 204));

    let g = tiny();
    let n = 600;
    let toks: Vec<Vec<f32>> = (0..n as u64).map(|i| token(i * 3 + 1, g.kv_dim())).collect();
    let run = |cfg: PmkvqConfig, total: usize| run_budgeted(cfg, total, &toks);
    assert_eq!(
        PmkvqStore::new(g, eight(PmkvqConfig::pmkvq()), &[usize::MAX; 2], 4096)
            .unwrap()
            .layers[0]
            .k
            .body
            .bits,
        Bits::B8,
        "the body starts at the window's width"
    );
    // a budget where the bodies end at 4 bits in both, and one at the 2-bit (fitted) floor
    for (cfg, bits) in [(PmkvqConfig::pmkvq(), Bits::B4), (elastic(), Bits::B2)] {
        let floor = PmkvqStore::floor_bytes(g, &cfg, n);
        let total = if bits == Bits::B4 {
            floor * 3 / 2
        } else {
            floor + floor / 50
        };
        let (a, b) = (run(cfg.clone(), total), run(eight(cfg.clone()), total));
        // a spill of the 8-bit window restores bit-exactly, and only into a store whose window is 8-bit
        let data = b.spill().unwrap();
        let mut r = PmkvqStore::new(g, eight(cfg.clone()), &[usize::MAX; 2], 4096).unwrap();
        r.restore(&data).unwrap();
        assert_eq!(r.spill().unwrap(), data);
        let mut other = PmkvqStore::new(g, cfg, &[usize::MAX; 2], 4096).unwrap();
        assert!(matches!(other.restore(&data), Err(KvError::Corrupt(_))));
        for (la, lb) in a.layers.iter().zip(&b.layers) {
            for (sa, sb) in [(&la.k, &lb.k), (&la.v, &lb.v)] {
                assert_eq!(sa.body.bits, bits);
                assert_eq!(sb.body.bits, bits);
                assert_eq!(sb.window.bits, Bits::B8);
                // the 8-bit window's store can only have kept more tokens out of the body, never fewer
                assert!(sb.window.len() >= sa.window.len());
                if bits == Bits::B4 {
                    assert_eq!(sa.body.len(), sb.body.len());
                }
                let (mut x, mut y) = (vec![0f32; g.kv_dim()], vec![0f32; g.kv_dim()]);
                if bits == Bits::B4 {
                    // the same codes but where f32 rounding lands a value on the other side of a tie (one code
                    // step, rarely); the parameters differ only by their f16 rounding (S₁₆·257 against S₈)
                    let (mut codes, mut off) = (0usize, 0usize);
                    for gi in 0..sb.body.len() * sb.body.groups_per_token() {
                        let ((ca, xa, oa), (cb, xb, ob)) = (sa.body.group_at(gi), sb.body.group_at(gi));
                        for (p, q) in ca.iter().zip(cb) {
                            for sh in [0, 4] {
                                let (p, q) = ((p >> sh) & 15, (q >> sh) & 15);
                                assert!(p.abs_diff(q) <= 1, "group {gi}: {p} vs {q}");
                                off += usize::from(p != q);
                                codes += 1;
                            }
                        }
                        assert!(
                            (xa - xb).abs() <= 2e-3 * xa.abs() && oa == ob,
                            "group {gi}: {xa} {xb} {oa} {ob}"
                        );
                    }
                    assert!(off * 1000 <= codes, "{off} of {codes} codes differ");
                } else {
                    // the fitted floor refits from those 4-bit values: as close to what was appended
                    let common = sa.body.len().min(sb.body.len());
                    let err = |side: &Side, out: &mut Vec<f32>| -> f64 {
                        (0..common)
                            .map(|t| {
                                side.body.dequantize_token(t, out);
                                let orig = &toks[side.sink.len() + t];
                                out.iter().zip(orig).map(|(p, q)| f64::from(p - q).powi(2)).sum::<f64>()
                            })
                            .sum::<f64>()
                    };
                    let (ea, eb) = (err(sa, &mut x), err(sb, &mut y));
                    assert!(eb <= ea * 1.02 && ea <= eb * 1.02, "squared error {eb} vs {ea}");
                }
                // window tokens are the direct 8-bit quantization of what was appended
                let first = sb.sink.len() + sb.body.len();
                for (i, t) in (first..n).enumerate() {
                    let mut want = sb.window.empty_like(Bits::B8);
                    want.push_token(&toks[t]);
                    want.dequantize_token(0, &mut x);
                    sb.window.dequantize_token(i, &mut y);
                    assert_eq!(x, y, "window token {t}");
                }
            }
        }
    }
}
