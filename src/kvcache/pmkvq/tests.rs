//! Spec §10 items 4–5: the sink/body/window state machine and the budget timeline.

use super::*;
use crate::kvcache::quant::Bits;

fn geom(kv_heads: usize, head_dim: usize) -> KvGeometry {
    KvGeometry {
        layers: 1,
        q_heads: kv_heads,
        kv_heads,
        head_dim,
    }
}

fn token(seed: u64, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|c| (((seed * 7919 + c as u64 * 104729) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Store without attending (the storage path alone), as the model's call would after attention.
fn store(s: &mut PmkvqStore, toks: &[Vec<f32>]) -> Result<(), KvError> {
    let kv_dim = s.geom.kv_dim();
    let x: Vec<f32> = toks.iter().flatten().copied().collect();
    s.reserve(toks.len())?;
    let cfg = s.cfg.clone();
    let l = &mut s.layers[0];
    l.k.store(&cfg, &x, kv_dim);
    l.v.store(&cfg, &x, kv_dim);
    s.enforce(0)
}

fn counts(s: &PmkvqStore) -> (usize, usize, usize) {
    let k = &s.layers[0].k;
    (k.sink.len(), k.body.len(), k.window.len())
}

#[test]
fn prompt_splits_into_sink_body_and_window() {
    for p in [1usize, 2, 128, 129, 130, 300, 1000] {
        let g = geom(2, 64);
        let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX], 4096).unwrap();
        let toks: Vec<Vec<f32>> = (0..p as u64).map(|i| token(i, g.kv_dim())).collect();
        store(&mut s, &toks).unwrap();
        assert_eq!(counts(&s), (1, (p - 1) / 128 * 128, (p - 1) % 128), "prompt {p}");
    }
}

#[test]
fn decode_flushes_every_128_tokens_and_keeps_chronological_order() {
    let g = geom(2, 64);
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX], 4096).unwrap();
    let toks: Vec<Vec<f32>> = (0..400u64).map(|i| token(i, g.kv_dim())).collect();
    store(&mut s, &toks[..10]).unwrap();
    let mut flushes = vec![];
    for (i, t) in toks.iter().enumerate().skip(10) {
        let before = counts(&s).1;
        store(&mut s, std::slice::from_ref(t)).unwrap();
        if counts(&s).1 != before {
            flushes.push(i + 1); // stored length after the step
            assert_eq!(counts(&s).1 - before, 128, "a flush moves exactly 128 tokens");
            assert_eq!(counts(&s).2, 0, "the window empties on a flush");
        }
    }
    assert_eq!(flushes, vec![129, 257, 385]);
    // chronological: segments dequantize back to the tokens in order (16-bit: tiny error)
    let k = &s.layers[0].k;
    let mut t = 0;
    let mut buf = vec![0f32; g.kv_dim()];
    for seg in [&k.sink, &k.body, &k.window] {
        for i in 0..seg.len() {
            seg.dequantize_token(i, &mut buf);
            for (a, b) in buf.iter().zip(&toks[t]) {
                assert!((a - b).abs() < 2e-3, "token {t}: {a} vs {b}");
            }
            t += 1;
        }
    }
    assert_eq!(t, 400);
}

#[test]
fn multi_token_updates_after_prefill_flush_the_general_form() {
    let g = geom(1, 64);
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX], 4096).unwrap();
    let toks: Vec<Vec<f32>> = (0..300u64).map(|i| token(i, g.kv_dim())).collect();
    store(&mut s, &toks[..100]).unwrap(); // sink 1, window 99
    store(&mut s, &toks[100..160]).unwrap(); // window 99 + 60 = 159 -> flush 128, keep 31
    assert_eq!(counts(&s), (1, 128, 31));
    let k = &s.layers[0].k;
    let mut buf = vec![0f32; 64];
    k.body.dequantize_token(127, &mut buf); // the last flushed token is token 128
    assert!(buf.iter().zip(&toks[128]).all(|(a, b)| (a - b).abs() < 2e-3));
}

#[test]
fn current_token_is_unquantized_in_its_own_step() {
    // A store holding only 2-bit tokens: the output of one new token over [stored..., itself] must use its raw
    // K/V. Build the expected output with the stored tokens dequantized and the new one raw.
    let g = KvGeometry {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let mut s = PmkvqStore::new(g, PmkvqConfig::rtn(Bits::B2), &[usize::MAX], 64).unwrap();
    let toks: Vec<Vec<f32>> = (0..5u64).map(|i| token(i, 64)).collect();
    store(&mut s, &toks).unwrap();
    let q: Vec<f32> = (0..128).map(|i| ((i * 37 % 17) as f32 - 8.0) / 8.0).collect();
    let k_new: Vec<f32> = (0..64)
        .map(|i| if i == 3 { 9.0 } else { 0.1 * i as f32 / 64.0 })
        .collect();
    let v_new: Vec<f32> = (0..64).map(|i| (i as f32).sin()).collect();
    let mut out = vec![0f32; 128];
    s.attend_and_store(0, &q, &k_new, &v_new, 1, &mut out).unwrap();
    let body = &s.layers[0].k.body;
    let vbody = &s.layers[0].v.body;
    for h in 0..2 {
        let qh = &q[h * 64..(h + 1) * 64];
        let mut keys: Vec<Vec<f32>> = (0..5)
            .map(|t| {
                let mut b = vec![0f32; 64];
                body.dequantize_token(t, &mut b);
                b
            })
            .collect();
        let mut vals: Vec<Vec<f32>> = (0..5)
            .map(|t| {
                let mut b = vec![0f32; 64];
                vbody.dequantize_token(t, &mut b);
                b
            })
            .collect();
        keys.push(k_new.clone());
        vals.push(v_new.clone());
        let sc: Vec<f64> = keys
            .iter()
            .map(|kk| kk.iter().zip(qh).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() / 8.0)
            .collect();
        let m = sc.iter().cloned().fold(f64::MIN, f64::max);
        let z: f64 = sc.iter().map(|x| (x - m).exp()).sum();
        for c in 0..64 {
            let want: f64 = (0..6).map(|t| (sc[t] - m).exp() / z * vals[t][c] as f64).sum();
            assert!(
                (out[h * 64 + c] as f64 - want).abs() < 1e-4,
                "head {h} ch {c}: {} vs {want}",
                out[h * 64 + c]
            );
        }
    }
}

/// Spec §3.8 with the reference's own accounting (codes only) and its geometry (D_kv = 512, group 128):
/// an Fbit-2 layer sized for 32768 tokens stays at 16 bits up to L = 4096, halves on L = 4097, and runs out of
/// budget between L ≈ 31872 and 32761.
#[test]
fn fbit2_budget_timeline_matches_the_reference_accounting() {
    let g = geom(4, 128);
    let budget = 2 * 2 * 512 * 32768 / 8;
    let cfg = PmkvqConfig {
        payload_accounting: true,
        ..PmkvqConfig::pmkvq()
    };
    let mut s = PmkvqStore::new(g, cfg, &[budget], 40_000).unwrap();
    let tok = token(1, g.kv_dim());
    let mut changes = vec![];
    let mut bits = 16;
    let mut l = 0usize;
    let oob = loop {
        match store(&mut s, std::slice::from_ref(&tok)) {
            Ok(()) => {
                l += 1;
                let b = s.layer_bits()[0];
                if b != bits {
                    changes.push((l, b));
                    bits = b;
                }
                assert!(
                    super::charged_bytes(&s.cfg, &s.layers[0]) <= budget,
                    "over budget at L = {l}"
                );
            }
            Err(KvError::OutOfBudget { .. }) => break l + 1,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(changes[0], (4097, 8), "first halving");
    assert!(
        (8064..=8192).contains(&changes[1].0) && changes[1].1 == 4,
        "{changes:?}"
    );
    assert!(
        (16000..=16381).contains(&changes[2].0) && changes[2].1 == 2,
        "{changes:?}"
    );
    assert!((31872..=32761).contains(&oob), "out of budget at L = {oob}");
    assert_eq!(s.len(0), oob - 1, "the refused token was not stored");
}

/// The same timeline with our geometry (SmolLM2: D_kv = 192, head_dim 64) and true-byte accounting: each level
/// holds until its true bytes pass the budget, computed here from the byte formula independently of the store.
#[test]
fn fbit2_budget_timeline_with_our_geometry_and_true_bytes() {
    let g = geom(3, 64);
    let budget = 2 * 2 * 192 * 32768 / 8; // Fbit 2, payload-sized, as the paper sizes budgets
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[budget], 40_000).unwrap();
    // true bytes of one token in one of K/V at b bits: 3 groups of 64 codes + f16 scale + f16 offset each
    let tb = |b: usize| 3 * (64 * b / 8 + 4);
    let tok = token(3, g.kv_dim());
    let mut bits = 16usize;
    let mut l = 0usize;
    loop {
        match store(&mut s, std::slice::from_ref(&tok)) {
            Ok(()) => {
                l += 1;
                let (sink, body, win) = counts(&s);
                let at = |b: usize| 2 * ((sink + win) * tb(16) + body * tb(b)) + LAYER_BOOKKEEPING;
                let b = s.layer_bits()[0] as usize;
                assert!(at(b) <= budget, "L = {l}: {b} bits do not fit");
                assert!(b <= bits, "widths only go down");
                // a level is left only on the step where it stopped fitting
                if b < bits {
                    assert!(
                        at(b * 2) > budget,
                        "L = {l}: dropped to {b} bits although {} still fit",
                        b * 2
                    );
                }
                bits = b;
            }
            Err(KvError::OutOfBudget {
                need,
                budget: bud,
                floor_bits,
                ..
            }) => {
                assert_eq!(floor_bits, 2);
                assert!(need > bud);
                break;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // ≈ 2.5 bits per element at the floor plus 16-bit sink/window: the 2-bit body holds ~26.5k tokens here
    assert!((25_000..30_000).contains(&l), "stored {l} tokens");
}

#[test]
fn lowering_the_budget_shrinks_before_the_next_step_and_refusals_change_nothing() {
    let g = geom(3, 64);
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX], 10_000).unwrap();
    let toks: Vec<Vec<f32>> = (0..1000u64).map(|i| token(i, g.kv_dim())).collect();
    store(&mut s, &toks).unwrap();
    assert_eq!(s.layer_bits(), vec![16]);
    let used = s.true_bytes();
    s.set_layer_budgets(&[used / 3]).unwrap();
    assert!(s.true_bytes() <= used / 3);
    assert!(s.layer_bits()[0] <= 4, "{:?}", s.layer_bits());
    // a budget below the floor: typed error; nothing stored by a refused step
    let len = s.len(0);
    assert!(matches!(s.set_layer_budgets(&[1000]), Err(KvError::OutOfBudget { .. })));
    assert!(matches!(store(&mut s, &toks[..1]), Err(KvError::OutOfBudget { .. })));
    assert_eq!(s.len(0), len);
    assert!(matches!(s.set_layer_budgets(&[1, 2]), Err(KvError::BadBudgets { .. })));
}

#[test]
fn llama_semantics_attend_over_the_stored_prefix_including_the_token_itself() {
    let g = KvGeometry {
        layers: 1,
        q_heads: 2,
        kv_heads: 1,
        head_dim: 64,
    };
    let mut s = PmkvqStore::new(g, PmkvqConfig::llama(Bits::B4), &[usize::MAX], 64).unwrap();
    let n = 5;
    let k: Vec<f32> = (0..n).flat_map(|t| token(t as u64, 64)).collect();
    let v: Vec<f32> = (0..n).flat_map(|t| token(100 + t as u64, 64)).collect();
    let q: Vec<f32> = (0..n * 128).map(|i| ((i % 13) as f32 - 6.0) / 6.0).collect();
    let mut out = vec![0f32; n * 128];
    s.attend_and_store(0, &q, &k, &v, n, &mut out).unwrap();
    assert_eq!(s.len(0), n);
    // token 0 sees only itself: its output is its own stored (quantized) value
    let mut v0 = vec![0f32; 64];
    s.layers[0].v.body.dequantize_token(0, &mut v0);
    for h in 0..2 {
        for c in 0..64 {
            assert!(
                (out[h * 64 + c] - v0[c]).abs() < 1e-5,
                "{} vs {}",
                out[h * 64 + c],
                v0[c]
            );
        }
    }
}

#[test]
fn shares_split_the_budget_after_every_layer_gets_its_sink_and_window() {
    let g = KvGeometry {
        layers: 3,
        q_heads: 3,
        kv_heads: 3,
        head_dim: 64,
    };
    let cfg = PmkvqConfig::pmkvq();
    let fixed = 2 * 128 * 3 * (128 + 4) + LAYER_BOOKKEEPING;
    let b = PmkvqStore::budgets_from_shares(g, &cfg, 3 * fixed + 4000, &[0.25, 0.25, 0.5]);
    assert_eq!(b, vec![fixed + 1000, fixed + 1000, fixed + 2000]);
    assert!(b.iter().sum::<usize>() <= 3 * fixed + 4000);
    // below the fixed part: an even split
    assert_eq!(
        PmkvqStore::budgets_from_shares(g, &cfg, 300, &[0.25, 0.25, 0.5]),
        vec![100, 100, 100]
    );
}

#[test]
fn a_starved_layer_borrows_from_layers_with_room_and_the_total_never_grows() {
    let g = KvGeometry {
        layers: 2,
        q_heads: 3,
        kv_heads: 3,
        head_dim: 64,
    };
    // layer 0 gets a budget too small for 400 tokens even at 2 bits; layer 1 plenty
    let fixed = 2 * 128 * 3 * (128 + 4) + LAYER_BOOKKEEPING;
    let budgets = [fixed + 20_000, fixed + 400_000];
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &budgets, 10_000).unwrap();
    let k: Vec<f32> = (0..400u64).flat_map(|t| token(t, g.kv_dim())).collect();
    for t in 0..400 {
        s.reserve(1).unwrap();
        for l in 0..2 {
            s.append(l, &k[t * 192..(t + 1) * 192], &k[t * 192..(t + 1) * 192], 1)
                .unwrap();
        }
        let sum: usize = s.layer_budgets().iter().sum();
        assert_eq!(sum, budgets.iter().sum::<usize>(), "budgets move, the total stays");
        assert!((0..2).all(|l| s.layer_true_bytes(l) <= s.layer_budgets()[l]));
    }
    assert!(s.layer_budgets()[0] > budgets[0], "layer 0 borrowed");
}

fn attend_all(s: &mut dyn KvStore, q: &[f32]) -> Vec<f32> {
    // Attention of one query over what is stored (then roll the query's own K/V back).
    let g = s.geometry();
    let n0 = s.len(0);
    let mut out = vec![0.0; g.q_dim()];
    let kv = vec![0.0; g.kv_dim()];
    for l in 0..g.layers {
        s.attend_and_store(l, q, &kv, &kv, 1, &mut out).unwrap();
    }
    s.truncate(n0);
    out
}

#[test]
fn spill_and_restore_are_bit_exact_at_every_width() {
    let g = KvGeometry {
        layers: 3,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 3], 4096).unwrap();
    let x: Vec<f32> = (0..700).flat_map(|t| token(t, g.kv_dim())).collect();
    for l in 0..3 {
        s.append(l, &x, &x, 700).unwrap();
    }
    // Lower the budget so the bodies sit at mixed widths, with a 16-bit sink and window.
    let total = s.floor_bytes(1) + s.true_bytes() / 4;
    s.set_total_budget(total, Some(&[0.5, 0.3, 0.2]), 1).unwrap();
    assert!(s.true_bytes() <= total);
    assert!(s.requantizations() > 0);
    let bits = s.layer_bits();
    let data = s.spill().unwrap();
    let mut r = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 3], 4096).unwrap();
    r.restore(&data).unwrap();
    assert_eq!(r.layer_bits(), bits);
    assert_eq!(r.true_bytes(), s.true_bytes());
    assert_eq!(r.len(0), 700);
    assert_eq!(r.layer_budgets(), s.layer_budgets());
    assert_eq!(r.spill().unwrap(), data, "a restored store spills the same bytes");
    let q = token(9999, g.q_dim());
    assert_eq!(attend_all(&mut r, &q), attend_all(&mut s, &q));
    // A store of another configuration, or damaged data, is refused.
    let mut other = PmkvqStore::new(g, PmkvqConfig::rtn(Bits::B4), &[usize::MAX; 3], 4096).unwrap();
    assert!(matches!(other.restore(&data), Err(KvError::Corrupt(_))));
    let mut fresh = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 3], 4096).unwrap();
    assert!(fresh.restore(&data[..data.len() - 3]).is_err());
    assert_eq!(fresh.len(0), 0, "a failed restore leaves the store empty");
}

#[test]
fn total_budget_gives_every_layer_its_floor_first() {
    let g = KvGeometry {
        layers: 4,
        q_heads: 2,
        kv_heads: 2,
        head_dim: 32,
    };
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 4], 4096).unwrap();
    let x: Vec<f32> = (0..600).flat_map(|t| token(t, g.kv_dim())).collect();
    for l in 0..4 {
        s.append(l, &x, &x, 600).unwrap();
    }
    let floor = s.floor_bytes(1);
    // Very uneven shares: the small layers still get what they must hold.
    s.set_total_budget(floor + 1000, Some(&[0.97, 0.01, 0.01, 0.01]), 1)
        .unwrap();
    assert!(s.true_bytes() <= floor + 1000);
    s.reserve(1).expect("one more token fits");
    assert!(matches!(
        s.set_total_budget(floor - 1, None, 1),
        Err(KvError::OutOfBudget { .. })
    ));
}

#[test]
fn a_window_about_to_flush_still_gets_what_it_holds_now() {
    // 1 sink + 256 body + 127 window tokens: the next token flushes the 16-bit window into the narrow body, so
    // the layer needs fewer bytes after the step than it holds before it. Its floor and its budget must cover
    // both, or fitting it fails although the step fits.
    let g = KvGeometry {
        layers: 2,
        q_heads: 2,
        kv_heads: 2,
        head_dim: 32,
    };
    let mut s = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 2], 4096).unwrap();
    let x: Vec<f32> = (0..384).flat_map(|t| token(t, g.kv_dim())).collect();
    for l in 0..2 {
        s.append(l, &x, &x, 384).unwrap();
    }
    assert_eq!(counts(&s), (1, 256, 127));
    let floor = s.floor_bytes(1);
    s.set_total_budget(floor, None, 1)
        .expect("the floor is enough, now and after the step");
    assert!(s.true_bytes() <= floor);
    s.reserve(1).expect("and the step fits");
}

/// Issue 15 item 6: under a budget cut, a sequence (the engine's loop: fit the whole cache to the budget, reserve
/// the step, store) runs until the floor itself no longer fits — with calibrated, uneven shares too.
#[test]
fn a_cut_budget_holds_the_sequence_until_the_floor_itself_no_longer_fits() {
    let g = KvGeometry {
        layers: 30,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let cfg = PmkvqConfig::pmkvq();
    let shares: Vec<f64> = (0..30).map(|l| if l % 4 == 1 { 2.0 } else { 1.0 }).collect();
    let (before, after, cut_at) = (25_300_000usize, 8_850_000usize, 1100usize);
    let last_fit = (0..4096)
        .take_while(|&t| PmkvqStore::floor_bytes(g, &cfg, t) <= after)
        .last()
        .unwrap();
    for shares in [None, Some(&shares[..])] {
        let mut s = PmkvqStore::new(g, cfg.clone(), &vec![usize::MAX; 30], 4096).unwrap();
        let x = token(3, g.kv_dim());
        let ended = run_cut(&mut s, (before, after, cut_at), shares, |_| x.clone(), |_, _| {});
        assert!(
            ended.0 + 1 >= last_fit,
            "shares {:?}: ended at {} ({}), the floor fits {last_fit} tokens",
            shares.is_some(),
            ended.0,
            ended.1
        );
    }
}

/// The engine's loop under a budget cut: `before` bytes until `cut_at` tokens are stored, `after` from then on.
/// Each step fits the whole cache to the budget, reserves the step and stores token `x(i)` in every layer; the
/// cache is within the budget after every step, and `each` sees it then. Ends at the first refusal: the tokens
/// stored and the refusal.
pub(super) fn run_cut(
    s: &mut PmkvqStore,
    (before, after, cut_at): (usize, usize, usize),
    shares: Option<&[f64]>,
    x: impl Fn(usize) -> Vec<f32>,
    mut each: impl FnMut(&PmkvqStore, usize),
) -> (usize, KvError) {
    let mut stored = 0;
    loop {
        let total = if stored < cut_at { before } else { after };
        if let Err(e) = s.set_total_budget(total, shares, 1).and_then(|_| s.reserve(1)) {
            return (stored, e);
        }
        let x = x(stored);
        for li in 0..s.geom.layers {
            s.append(li, &x, &x, 1).unwrap();
        }
        stored += 1;
        assert!(
            s.true_bytes() <= total,
            "{} bytes over the budget {total} at {stored}",
            s.true_bytes()
        );
        each(s, stored);
    }
}
