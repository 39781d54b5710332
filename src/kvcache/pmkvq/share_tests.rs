//! The window capped at a share of the budget (issue 15): the paper's 128 recent tokens at 16 bits until the
//! budget binds, then at 8 bits and as many as a sixth of a layer's budget pays for.

use super::elastic_tests::{smol, tiny, token};
use super::tests::run_cut;
use super::*;
use crate::kvcache::quant::ShiftMode;
use std::sync::Arc;

/// The method as shipped, without a profile: the paper's 128-token window capped at a sixth, elastic, fitted floor.
fn capped() -> PmkvqConfig {
    PmkvqConfig {
        window_share: Some(6),
        elastic_window: true,
        shift: ShiftMode::Fitted,
        ..PmkvqConfig::pmkvq()
    }
}

#[test]
fn the_window_is_the_full_one_until_the_budget_binds_then_what_a_sixth_pays_for_at_8_bits() {
    let (g, c) = (smol(), capped());
    // one token of one side on SmolLM2's shape: 396 true bytes at 16 bits, 204 at 8 (3 groups of 64 codes and
    // two f16 parameters each); K and V together, in 30 layers, a sixth each
    let sixth = |w: usize, per_side: usize| 30 * 6 * w * 2 * per_side;
    let lossless = |t: usize| 30 * (2 * t * 396 + LAYER_BOOKKEEPING);
    assert_eq!(c.window_for(g, usize::MAX, 100_000), (128, Bits::B16));
    // every token fits at 16 bits: the full window, however little of the budget is left for it
    assert_eq!(c.window_for(g, lossless(5000), 5000), (128, Bits::B16));
    assert_eq!(c.window_for(g, lossless(300), 300), (128, Bits::B16));
    // one token more: the budget binds, and the window narrows however much its share holds at 16 bits
    assert_eq!(c.window_for(g, lossless(5000), 5001), (128, Bits::B8));
    // and then holds what a sixth pays for at 8 bits
    let t = 100_000;
    assert_eq!(c.window_for(g, sixth(66, 204), t), (66, Bits::B8));
    assert_eq!(c.window_for(g, sixth(66, 204) - 1, t), (65, Bits::B8));
    assert_eq!(c.window_for(g, sixth(200, 204), t), (128, Bits::B8));
    assert_eq!(c.window_for(g, 1000, t), (PmkvqConfig::MIN_CAPPED_WINDOW, Bits::B8));
    // without a share the window is the configured one whatever the budget
    assert_eq!(PmkvqConfig::pmkvq().window_for(g, 1000, t), (128, Bits::B16));
    for total in (1..400).map(|i| i * 250_000) {
        let (w, bits) = c.window_for(g, total, t);
        assert_eq!(bits, Bits::B8);
        assert!(
            w == PmkvqConfig::MIN_CAPPED_WINDOW || 30 * 2 * w * 204 <= total / 6,
            "{total}: {w} tokens"
        );
        // a window holding 8-bit tokens stays at 8 bits (ERS only lowers) even once every token would fit
        assert_eq!(c.window_within(g, total, 0, Some(Bits::B8)).1, Bits::B8);
    }
}

/// The engine's loop with a budget cut: before it the window is the full 16-bit one; the step after, every
/// layer's window is at 8 bits and holds no more than the sixth pays for, bodies are never wider than it, and
/// the cache is within the budget after every step (split by shares and planned alike).
#[test]
fn a_budget_cut_narrows_then_shortens_the_window_within_the_step() {
    let g = tiny();
    let n = 900;
    let floor = PmkvqStore::floor_bytes(g, &capped(), n);
    let (before, after, cut_at) = (100_000_000usize, floor * 2, 500usize);
    let (want, wbits) = capped().window_for(g, after, cut_at);
    assert_eq!(wbits, Bits::B8);
    assert!(want > PmkvqConfig::MIN_CAPPED_WINDOW && want < 128, "{want}");
    let row = |f: f64| [0.0, 1e-4 * f, 1e-2 * f, f];
    let planned = PmkvqConfig {
        sensitivity: Some(Arc::new(Sensitivity {
            k: vec![row(4.0), row(1.0)],
            v: vec![row(1.0), row(2.0)],
        })),
        ..capped()
    };
    for cfg in [capped(), planned] {
        let mut s = PmkvqStore::new(g, cfg.clone(), &[usize::MAX; 2], 4096).unwrap();
        let x = |i: usize| token(i as u64, g.kv_dim());
        let mut seen_after = 0;
        let ended = run_cut(&mut s, (before, after, cut_at), None, x, |s, stored| {
            let (window, bits) = (s.cfg.window, s.cfg.window_bits);
            if stored <= cut_at {
                assert_eq!((window, bits), (128, Bits::B16), "before the cut, at {stored}");
            } else {
                assert_eq!((window, bits), (want, Bits::B8), "after the cut, at {stored}");
                seen_after += 1;
            }
            for l in &s.layers {
                for side in [&l.k, &l.v] {
                    assert!(
                        side.window.len() < window,
                        "{} tokens in a {window}-token window",
                        side.window.len()
                    );
                    assert_eq!(side.window.bits, bits);
                    assert!(side.body.bits <= bits);
                }
                let win_bytes = l.k.window.true_bytes() + l.v.window.true_bytes();
                let total = if stored <= cut_at { before } else { after };
                assert!(win_bytes <= total / 2 / 6, "window {win_bytes} bytes of {total}");
            }
        });
        assert!(
            seen_after > 300,
            "{}: ended at {} ({})",
            cfg.plans_widths(),
            ended.0,
            ended.1
        );
    }
}

/// Until the budget binds the capped store is the uncapped one, bit for bit; the step the cache at 16 bits no
/// longer fits, its window narrows to 8 bits (ERS from the 16-bit tokens) and the bodies are lowered as planned.
#[test]
fn the_window_narrows_the_step_the_budget_binds_and_not_before() {
    let g = tiny();
    let uncapped = PmkvqConfig {
        window_share: None,
        ..capped()
    };
    // exactly the bytes of 700 tokens at 16 bits
    let n = 700;
    let budget = 2 * (2 * n * uncapped.token_bytes_in(g, Seg::Sink) + LAYER_BOOKKEEPING);
    let toks: Vec<Vec<f32>> = (0..n as u64 + 1).map(|i| token(i, g.kv_dim())).collect();
    let run = |cfg: PmkvqConfig, toks: &[Vec<f32>]| {
        let mut s = PmkvqStore::new(g, cfg, &[usize::MAX; 2], 4096).unwrap();
        for x in toks {
            s.set_total_budget(budget, None, 1).unwrap();
            s.reserve(1).unwrap();
            for li in 0..2 {
                s.append(li, x, x, 1).unwrap();
            }
            assert!(s.true_bytes() <= budget);
        }
        s
    };
    let (a, b) = (run(uncapped, &toks[..n]), run(capped(), &toks[..n]));
    assert_eq!(b.true_bytes(), budget, "700 tokens at 16 bits fill it");
    assert_eq!(b.cfg.window_bits, Bits::B16);
    assert_eq!(a.spill().unwrap(), b.spill().unwrap());
    let c = run(capped(), &toks);
    assert_eq!(c.cfg.window_bits, Bits::B8);
    let want = capped().window_tokens_at(g, budget, Bits::B8);
    assert_eq!(c.cfg.window, want);
    for l in &c.layers {
        // the window's tokens: those after the last whole chunk of the narrowed window, lowered from 16 bits
        let side = &l.k;
        assert!(side.window.len() < want && side.body.bits < Bits::B16);
        let first = side.sink.len() + side.body.len();
        let (mut x, mut y) = (vec![0f32; g.kv_dim()], vec![0f32; g.kv_dim()]);
        for (i, t) in (first..=n).enumerate() {
            let mut expect = side.window.empty_like(Bits::B16);
            expect.push_token(&toks[t]);
            if t < n {
                expect.shrink_to(Bits::B8, ShiftMode::Fitted);
            } else {
                expect = side.window.empty_like(Bits::B8);
                expect.push_token(&toks[t]);
            }
            expect.dequantize_token(0, &mut x);
            side.window.dequantize_token(i, &mut y);
            assert_eq!(x, y, "window token {t}");
        }
    }
}

/// A narrowed window spills and restores bit-exactly, only into a store that may narrow; restored under a
/// smaller budget it is capped again as it is read; a clear store widens again.
#[test]
fn a_narrowed_window_spills_restores_and_widens_only_when_empty() {
    let g = tiny();
    let mut s = PmkvqStore::new(g, capped(), &[usize::MAX; 2], 4096).unwrap();
    let floor = PmkvqStore::floor_bytes(g, &capped(), 600);
    let total = floor * 2;
    for i in 0..600u64 {
        s.set_total_budget(total, None, 1).unwrap();
        s.reserve(1).unwrap();
        let x = token(i, g.kv_dim());
        for li in 0..2 {
            s.append(li, &x, &x, 1).unwrap();
        }
    }
    assert_eq!(s.cfg.window_bits, Bits::B8);
    // a bigger budget does not widen a window holding 8-bit tokens
    s.set_total_budget(usize::MAX / 4, None, 1).unwrap();
    assert_eq!((s.cfg.window, s.cfg.window_bits), (128, Bits::B8));
    s.set_total_budget(total, None, 1).unwrap();
    let data = s.spill().unwrap();
    let mut r = PmkvqStore::new(g, capped(), &[usize::MAX; 2], 4096).unwrap();
    r.restore(&data).unwrap();
    assert_eq!(r.spill().unwrap(), data);
    let uncapped = PmkvqConfig {
        window_share: None,
        ..capped()
    };
    let mut other = PmkvqStore::new(g, uncapped, &[usize::MAX; 2], 4096).unwrap();
    assert!(matches!(other.restore(&data), Err(KvError::Corrupt(_))));
    // restored under less: the window is the one that budget sizes, the cache within it
    let less = total * 2 / 3;
    let mut r = PmkvqStore::new(g, capped(), &[usize::MAX; 2], 4096).unwrap();
    r.restore_within(&data, less, None, 1).unwrap();
    assert_eq!((r.cfg.window, r.cfg.window_bits), capped().window_for(g, less, 601));
    assert!(r.true_bytes() <= less);
    assert!(r.layers.iter().all(|l| l.k.window.len() < r.cfg.window));
    assert_eq!(r.len(0), 600);
    r.clear();
    r.set_total_budget(usize::MAX / 4, None, 1).unwrap();
    assert_eq!((r.cfg.window, r.cfg.window_bits), (128, Bits::B16));
    assert_eq!(r.layers[1].v.window.bits, Bits::B16);
}
