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
