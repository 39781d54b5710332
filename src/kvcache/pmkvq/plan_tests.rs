//! The planned store (issue 15): under a total budget, every K and V body's width is chosen on the calibrated
//! sensitivity, bodies only go down, and the total is never exceeded.

use super::*;
use std::sync::Arc;

fn geom() -> KvGeometry {
    KvGeometry {
        layers: 4,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
    }
}

fn token(seed: u64, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|c| (((seed * 7919 + c as u64 * 104729) % 1000) as f32 / 500.0) - 1.0)
        .collect()
}

/// Layer 0's K is ten times as sensitive as anything else; layer 3's V a tenth.
fn sensitivity() -> Arc<Sensitivity> {
    let row = |f: f64| [0.0, 1e-4 * f, 1e-2 * f, f];
    Arc::new(Sensitivity {
        k: vec![row(10.0), row(1.0), row(1.0), row(1.0)],
        v: vec![row(1.0), row(1.0), row(1.0), row(0.1)],
    })
}

fn planned() -> PmkvqStore {
    let cfg = PmkvqConfig {
        sensitivity: Some(sensitivity()),
        ..PmkvqConfig::pmkvq()
    };
    PmkvqStore::new(geom(), cfg, &[usize::MAX; 4], 8192).unwrap()
}

fn widths(s: &PmkvqStore) -> Vec<[Bits; 2]> {
    s.layers.iter().map(|l| [l.k.body.bits, l.v.body.bits]).collect()
}

#[test]
fn a_planned_store_keeps_sensitive_bodies_wide_and_runs_to_its_floor_within_the_total() {
    let g = geom();
    let mut s = planned();
    let fp16_1000 = 1000 * 2 * g.kv_dim() * 2 * g.layers;
    let total = fp16_1000 / 3;
    let last_fit = (0..8192)
        .take_while(|&t| PmkvqStore::floor_bytes(g, &PmkvqConfig::pmkvq(), t) <= total)
        .last()
        .unwrap();
    let mut before = widths(&s);
    let mut saw_asymmetry = false;
    let mut stored = 0;
    loop {
        // the engine's loop: fit the cache to the budget, reserve the step, store it
        if s.set_total_budget(total, None, 1).and_then(|_| s.reserve(1)).is_err() {
            break;
        }
        let x = token(stored as u64, g.kv_dim());
        for li in 0..g.layers {
            s.append(li, &x, &x, 1).unwrap();
        }
        stored += 1;
        assert!(s.true_bytes() <= total, "{} > {total} at {stored}", s.true_bytes());
        let now = widths(&s);
        for (a, b) in before.iter().zip(&now) {
            assert!(
                b[0] <= a[0] && b[1] <= a[1],
                "a body went back up at {stored}: {a:?} -> {b:?}"
            );
        }
        let w = &now;
        // the most sensitive body is never narrower than any other; the least never wider
        let all = w.iter().flatten();
        assert!(all.clone().all(|b| w[0][0] >= *b), "{w:?} at {stored}");
        assert!(all.clone().all(|b| w[3][1] <= *b), "{w:?} at {stored}");
        saw_asymmetry |= w.iter().any(|[k, v]| k != v);
        before = now;
    }
    assert!(saw_asymmetry, "K and V took different widths somewhere");
    assert!(
        stored + 1 >= last_fit,
        "ended at {stored}, the 2-bit floor fits {last_fit}"
    );
    assert!(
        widths(&s).iter().flatten().all(|b| *b == Bits::B2),
        "all at the floor at the end"
    );
}

#[test]
fn a_planned_store_spills_bit_exactly_and_restores_into_a_smaller_total() {
    let g = geom();
    let mut s = planned();
    let x: Vec<f32> = (0..700).flat_map(|t| token(t, g.kv_dim())).collect();
    for li in 0..g.layers {
        s.append(li, &x, &x, 700).unwrap();
    }
    let total = s.floor_bytes(1) + s.true_bytes() / 5;
    s.set_total_budget(total, None, 1).unwrap();
    assert!(s.true_bytes() <= total);
    let w = widths(&s);
    assert!(w.iter().any(|[k, v]| k != v), "{w:?}");
    let data = s.spill().unwrap();
    let mut r = planned();
    r.restore(&data).unwrap();
    assert_eq!(widths(&r), w);
    assert_eq!(r.spill().unwrap(), data);
    // into less: lowered as it is read, never over the new total, never wider than before
    let smaller = s.floor_bytes(1) + s.true_bytes() / 10;
    let mut r = planned();
    r.restore_within(&data, smaller, None, 1).unwrap();
    assert!(r.true_bytes() <= smaller, "{} > {smaller}", r.true_bytes());
    for (a, b) in w.iter().zip(&widths(&r)) {
        assert!(b[0] <= a[0] && b[1] <= a[1]);
    }
    assert!(r.true_bytes() < s.true_bytes());
    assert!(matches!(
        planned().restore_within(&data, s.floor_bytes(1) - 1, None, 1),
        Err(KvError::OutOfBudget { .. })
    ));
}

#[test]
fn without_a_total_a_planned_store_keeps_every_token_at_16_bits() {
    let g = geom();
    let mut s = planned();
    let x: Vec<f32> = (0..300).flat_map(|t| token(t, g.kv_dim())).collect();
    for li in 0..g.layers {
        s.reserve(300).unwrap();
        s.append(li, &x, &x, 300).unwrap();
    }
    assert!(widths(&s).iter().flatten().all(|b| *b == Bits::B16));
    assert!(matches!(
        PmkvqStore::new(
            KvGeometry { layers: 3, ..g },
            PmkvqConfig {
                sensitivity: Some(sensitivity()),
                ..PmkvqConfig::pmkvq()
            },
            &[usize::MAX; 3],
            10
        ),
        Err(KvError::BadBudgets { .. })
    ));
}

/// A prompt chunk through every layer as the model runs it: reserve, then attend and store layer by layer.
/// Returns each layer's attention output and checks the total after every layer.
fn chunk_step(s: &mut PmkvqStore, first: u64, n: usize, total: usize) -> Result<Vec<Vec<f32>>, KvError> {
    let g = geom();
    s.reserve(n)?;
    let x: Vec<f32> = (first..first + n as u64).flat_map(|t| token(t, g.kv_dim())).collect();
    let q: Vec<f32> = (first..first + n as u64)
        .flat_map(|t| token(t + 31, g.q_heads * g.head_dim))
        .collect();
    let mut outs = Vec::new();
    for li in 0..g.layers {
        let mut out = vec![0.0; q.len()];
        s.attend_and_store(li, &q, &x, &x, n, &mut out)?;
        assert!(
            s.true_bytes() <= total,
            "{} > {total} after layer {li} of a {n}-token step",
            s.true_bytes()
        );
        outs.push(out);
    }
    Ok(outs)
}

#[test]
fn a_prompt_chunk_reads_the_layers_it_lowers_as_they_were_before_the_step() {
    let g = geom();
    let mut s = planned();
    let total = 1000 * 2 * g.kv_dim() * 2 * g.layers / 5;
    s.set_total_budget(total, None, 400).unwrap();
    chunk_step(&mut s, 0, 400, total).unwrap();
    let before = widths(&s);
    // the same cache, unbounded: it reads what the chunk should read (the widths before the step)
    let same_before = s.spill().unwrap();
    let mut same = planned();
    same.restore(&same_before).unwrap();
    same.set_layer_budgets(&[usize::MAX; 4]).unwrap();
    s.reserve(400).unwrap();
    let waiting: Vec<usize> = (0..g.layers).filter(|&li| s.deferred[li].is_some()).collect();
    assert!(!waiting.is_empty(), "the step lowers some layer after its read");
    for &li in &waiting {
        assert_eq!(widths(&s)[li], before[li], "layer {li} waits: not lowered up front");
    }
    s.truncate(400);
    let got = chunk_step(&mut s, 400, 400, total).unwrap();
    let want = chunk_step(&mut same, 400, 400, usize::MAX).unwrap();
    for li in waiting {
        assert_eq!(got[li], want[li], "layer {li} read its pre-step widths");
    }
    let after = widths(&s);
    assert!(after != before, "the step lowered: {before:?} -> {after:?}");
    // the daemon fits every cache to its share before each step (set_total_budget with the step's tokens
    // ahead): the step still reads what it read above
    let mut fitted = planned();
    fitted.restore(&same_before).unwrap();
    fitted.set_total_budget(total, None, 400).unwrap();
    assert!(fitted.true_bytes() <= total);
    assert_eq!(chunk_step(&mut fitted, 400, 400, total).unwrap(), got);
    assert!(
        s.deferred.iter().all(Option::is_none),
        "every waiting layer was lowered at its store"
    );
}

#[test]
fn chunked_steps_never_exceed_the_total_between_layers_and_go_first_where_waiting_would() {
    let g = geom();
    let total = 3000 * 2 * g.kv_dim() * 2 * g.layers / 6;
    let (mut waited, mut went_first) = (false, false);
    for (case, chunk) in [37usize, 128, 250, 511, 700].into_iter().enumerate() {
        let mut s = planned();
        s.set_total_budget(total, None, chunk).unwrap();
        let mut stored = 0u64;
        let mut before = widths(&s);
        loop {
            // which lowered layers wait and which go first, as the plan decides: reserve once to look (the step
            // reserves again, from where this left it, as a daemon step after set_total_budget does)
            match s.reserve(chunk) {
                Ok(()) => {}
                Err(KvError::OutOfBudget { .. }) => break,
                Err(e) => panic!("case {case}: {e}"),
            }
            let lowered_now = widths(&s) != before;
            waited |= s.deferred.iter().any(Option::is_some);
            went_first |= lowered_now && s.deferred.iter().any(Option::is_some);
            match chunk_step(&mut s, stored, chunk, total) {
                Ok(_) => {}
                Err(KvError::OutOfBudget { .. }) => break,
                Err(e) => panic!("case {case}: {e}"),
            }
            stored += chunk as u64;
            let now = widths(&s);
            for (a, b) in before.iter().zip(&now) {
                assert!(b[0] <= a[0] && b[1] <= a[1], "case {case}: a body went back up");
            }
            before = now;
        }
        assert!(stored >= 1000, "case {case}: {chunk}-token chunks stopped at {stored}");
    }
    assert!(waited, "some step let a layer wait for its read");
    assert!(went_first, "some step lowered one layer first and let another wait");
}

/// Without a profile the shipped method plans one budget over every body on the uniform table: at a quarter of
/// the fp16 bytes some bodies stay at 4 bits, where equal shares drop every layer to 2 bits together and leave
/// bytes unused.
#[test]
fn without_calibration_one_plan_spends_the_bytes_equal_shares_leave() {
    let g = KvGeometry { head_dim: 64, ..geom() };
    let uniform = PmkvqConfig {
        sensitivity: Some(Arc::new(Sensitivity::uniform())),
        ..PmkvqConfig::pmkvq()
    };
    let mut planned = PmkvqStore::new(g, uniform, &[usize::MAX; 4], 8192).unwrap();
    assert_eq!(
        planned.cfg.sensitivity.as_ref().map(|s| s.layers()),
        Some(g.layers),
        "the uniform table is filled in for the store's layers"
    );
    let mut shares = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 4], 8192).unwrap();
    let n = 2048;
    let total = n * 2 * g.kv_dim() * 2 * g.layers / 4;
    for t in 0..n {
        let x = token(t as u64, g.kv_dim());
        for s in [&mut planned, &mut shares] {
            s.set_total_budget(total, None, 1).unwrap();
            s.reserve(1).unwrap();
            for li in 0..g.layers {
                s.append(li, &x, &x, 1).unwrap();
            }
            assert!(s.true_bytes() <= total, "{} > {total} at {t}", s.true_bytes());
        }
    }
    let (w_shares, w_planned) = (widths(&shares), widths(&planned));
    assert!(
        w_shares.iter().flatten().all(|&b| b == Bits::B2),
        "equal shares: every layer at 2 bits together ({w_shares:?})"
    );
    let wide = w_planned.iter().flatten().filter(|&&b| b == Bits::B4).count();
    assert!(
        wide > 0 && w_planned.iter().flatten().all(|&b| b <= Bits::B4),
        "{w_planned:?}"
    );
    // what the 4-bit bodies take is what equal shares leave unused
    assert!(
        planned.true_bytes() > shares.true_bytes() + (total - shares.true_bytes()) / 2,
        "planned {} vs shares {} of {total}",
        planned.true_bytes(),
        shares.true_bytes()
    );
}
