//! The sliding-window store: attention over exactly each token's window, one-step rollback, spills, bounded
//! bytes and budgets that hold with the windows' cost set aside.

use super::*;
use crate::kvcache::{KvMethod, MethodSpec};

const WINDOW: usize = 8;

fn geom() -> KvGeometry {
    KvGeometry {
        layers: 3,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
    }
}

/// Layers 0 and 2 slide, layer 1 is global.
fn win() -> Windowing {
    Windowing {
        window: WINDOW,
        local: vec![true, false, true],
    }
}

fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn fp16_store(max: usize) -> Box<dyn KvStore> {
    MethodSpec::plain(KvMethod::Fp16, None, "fp16")
        .new_store_in(geom(), Some(&win()), max)
        .unwrap()
}

/// Attention of one query row over f16-rounded keys/values `lo..=pos` (f64, the specification).
fn reference(q: &[f32], ks: &[Vec<f32>], vs: &[Vec<f32>], lo: usize, pos: usize) -> Vec<f32> {
    let g = geom();
    let (d, group) = (g.head_dim, g.group());
    let r = |x: f32| f16::from_f32(x).to_f32() as f64;
    let mut out = vec![0f32; g.q_dim()];
    for h in 0..g.q_heads {
        let kh = h / group;
        let qh: Vec<f64> = q[h * d..(h + 1) * d].iter().map(|&x| r(x)).collect();
        let scores: Vec<f64> = (lo..=pos)
            .map(|t| (0..d).map(|c| qh[c] * r(ks[t][kh * d + c])).sum::<f64>() / (d as f64).sqrt())
            .collect();
        let m = scores.iter().cloned().fold(f64::MIN, f64::max);
        let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f64 = e.iter().sum();
        for c in 0..d {
            out[h * d + c] = ((lo..=pos).zip(&e).map(|(t, p)| p * r(vs[t][kh * d + c])).sum::<f64>() / z) as f32;
        }
    }
    out
}

/// Run steps of the given sizes through every layer; returns each layer's outputs per token.
fn run(store: &mut dyn KvStore, steps: &[usize], seed: u64) -> Vec<Vec<Vec<f32>>> {
    let g = geom();
    let mut outs = vec![Vec::new(); g.layers];
    let mut pos = store.len(0);
    for (si, &n) in steps.iter().enumerate() {
        store.reserve(n).unwrap();
        for (l, layer_outs) in outs.iter_mut().enumerate() {
            let s = seed + (si * 31 + l) as u64 * 1000 + pos as u64;
            let q = values(s, n * g.q_dim());
            let k = values(s + 1, n * g.kv_dim());
            let v = values(s + 2, n * g.kv_dim());
            let mut out = vec![0f32; n * g.q_dim()];
            store.attend_and_store(l, &q, &k, &v, n, &mut out).unwrap();
            layer_outs.extend(out.chunks(g.q_dim()).map(<[f32]>::to_vec));
        }
        pos += n;
    }
    outs
}

#[test]
fn local_layers_attend_over_exactly_each_tokens_window() {
    let g = geom();
    let steps = [3, 1, 1, 5, SLACK + 6, 1, 1, 2, 1];
    let total: usize = steps.iter().sum();
    let mut store = fp16_store(total);
    let (mut ks, mut vs) = (vec![Vec::new(); g.layers], vec![Vec::new(); g.layers]);
    let mut pos = 0;
    for (si, &n) in steps.iter().enumerate() {
        for l in 0..g.layers {
            let s = (si * 31 + l) as u64 * 1000 + pos as u64;
            let (q, k, v) = (
                values(s, n * g.q_dim()),
                values(s + 1, n * g.kv_dim()),
                values(s + 2, n * g.kv_dim()),
            );
            ks[l].extend(k.chunks(g.kv_dim()).map(<[f32]>::to_vec));
            vs[l].extend(v.chunks(g.kv_dim()).map(<[f32]>::to_vec));
            let mut out = vec![0f32; n * g.q_dim()];
            store.attend_and_store(l, &q, &k, &v, n, &mut out).unwrap();
            for i in 0..n {
                let p = pos + i;
                let lo = if win().local[l] {
                    (p + 1).saturating_sub(WINDOW)
                } else {
                    0
                };
                let want = reference(&q[i * g.q_dim()..(i + 1) * g.q_dim()], &ks[l], &vs[l], lo, p);
                let got = &out[i * g.q_dim()..(i + 1) * g.q_dim()];
                let err = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(err < 2e-3, "layer {l}, position {p}: max error {err}");
            }
        }
        pos += n;
    }
    assert!((0..g.layers).all(|l| store.len(l) == total));
    assert_eq!(store.layer_bits(), vec![16, 16, 16]);
}

#[test]
fn a_local_layer_holds_a_bounded_window_however_long_the_trace() {
    let g = geom();
    let n = 2000;
    let mut store = fp16_store(n);
    let tok = 2 * g.kv_dim() * 2; // K and V at f16, one layer
    let cap = win().held_cap();
    let mut most = 0;
    for _ in 0..n {
        run(store.as_mut(), &[1], 7);
        let local = store.true_bytes() - store.len(1) * tok; // the global layer holds every token
        most = most.max(local);
    }
    assert!(
        most <= 2 * cap * tok,
        "windows held {most} bytes, bound {}",
        2 * cap * tok
    );
    assert!(
        most >= 2 * (WINDOW - 1) * tok,
        "windows hold at least what the next query reads"
    );
    assert_eq!(win().local_bytes(g, n), 2 * cap * tok);
}

#[test]
fn the_last_small_step_is_taken_back_exactly_and_a_big_one_says_it_cannot_be() {
    let steps = [5, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1];
    let base: usize = steps.iter().sum();
    let mut a = fp16_store(200);
    let mut b = fp16_store(200);
    run(a.as_mut(), &steps, 1);
    run(b.as_mut(), &steps, 1);
    // a takes a 3-token step, then gives it back; both then take the same step
    run(a.as_mut(), &[3], 99);
    a.truncate(base);
    assert!((0..3).all(|l| a.len(l) == base));
    assert_eq!(run(a.as_mut(), &[2], 5), run(b.as_mut(), &[2], 5));
    // a big step keeps only what the next query reads: rollback past it is refused, visibly
    let at = a.len(0);
    run(a.as_mut(), &[SLACK + 20], 6);
    a.truncate(at);
    assert_ne!(a.len(0), at, "a local layer cannot give back a step it evicted through");
    assert_eq!(a.len(1), at, "the global layer can");
}

#[test]
fn spill_and_restore_are_bit_exact() {
    let mut a = fp16_store(300);
    run(a.as_mut(), &[40, 1, 1, SLACK + 3, 1, 1, 1], 3);
    let mut bytes = Vec::new();
    a.spill_to(&mut bytes).unwrap();
    let mut b = fp16_store(300);
    b.restore(&bytes).unwrap();
    assert_eq!(b.true_bytes(), a.true_bytes());
    assert!((0..3).all(|l| a.len(l) == b.len(l)));
    assert_eq!(run(a.as_mut(), &[1, 1, 2], 8), run(b.as_mut(), &[1, 1, 2], 8));
    // a spill of another geometry is refused, and changes nothing
    let other = Windowing {
        window: WINDOW + 1,
        ..win()
    };
    let mut c = MethodSpec::plain(KvMethod::Fp16, None, "fp16")
        .new_store_in(geom(), Some(&other), 300)
        .unwrap();
    assert!(c.restore(&bytes).is_err());
    assert_eq!(c.len(0), 0);
}

#[test]
fn a_budgeted_pmkvq_store_never_exceeds_its_budget_and_lowers_its_windows_only_when_it_must() {
    let g = geom();
    let n = 600;
    let pmkvq = |budget| MethodSpec::plain("pmkvq".parse().unwrap(), Some(budget), "pmkvq");
    let fp16_global = n * 2 * g.kv_dim() * 2;
    // room for f16 windows and half of what the global layer would take at f16: the windows stay at f16
    let roomy = win().local_bytes(g, n) + fp16_global / 2;
    let mut store = pmkvq(roomy).new_store_in(g, Some(&win()), n).unwrap();
    for i in 0..n {
        run(store.as_mut(), &[1], i as u64);
        assert!(
            store.true_bytes() <= roomy,
            "step {i}: {} > {roomy}",
            store.true_bytes()
        );
    }
    let bits = store.layer_bits();
    assert_eq!(
        (bits[0], bits[2]),
        (16, 16),
        "windows stay at f16 while the global layer fits: {bits:?}"
    );
    assert!(bits[1] < 16, "the global layer was lowered to fit: {bits:?}");
    // room for everything at the floor plus windows at 4 bits: by the end the global layer at its floor cannot
    // share it with f16 windows, so the windows go down too
    let tight =
        pmkvq_floor(g, Some(&win()), n) + win().local_bytes_at(g, n, Bits::B4) - win().local_bytes_at(g, n, Bits::B2);
    let mut store = pmkvq(tight).new_store_in(g, Some(&win()), n).unwrap();
    for i in 0..n {
        run(store.as_mut(), &[1], i as u64);
        assert!(
            store.true_bytes() <= tight,
            "step {i}: {} > {tight}",
            store.true_bytes()
        );
    }
    let bits = store.layer_bits();
    assert!(bits[0] < 16 && bits[0] == bits[2], "windows lowered together: {bits:?}");
    // the floor a scheduler admits against counts the windows at 2 bits beside the global layer's floor; the
    // tools' floor (`eval --kv-budget min`) is never below it
    let empty = pmkvq(roomy).new_store_in(g, Some(&win()), n).unwrap();
    let alone = MethodSpec::plain("pmkvq".parse().unwrap(), None, "pmkvq")
        .new_store(KvGeometry { layers: 1, ..g }, n)
        .unwrap();
    assert_eq!(
        empty.floor_bytes(n),
        alone.floor_bytes(n) + win().local_bytes_at(g, n, Bits::B2)
    );
    assert!(pmkvq_floor(g, Some(&win()), n) >= empty.floor_bytes(n));
    // a budget below the windows' own floor is refused when the store is made
    let below = win().local_bytes_at(g, n, Bits::B2) / 2;
    assert!(matches!(
        pmkvq(below).new_store_in(g, Some(&win()), n),
        Err(KvError::OutOfBudget { .. })
    ));
}

#[test]
fn a_cut_mid_trace_lowers_the_windows_in_place_and_a_spill_keeps_them_bit_exactly() {
    let g = geom();
    let n = 400;
    let mut a = MethodSpec::plain("pmkvq".parse().unwrap(), None, "pmkvq")
        .new_store_in(g, Some(&win()), n)
        .unwrap();
    run(a.as_mut(), &[40, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 11);
    assert_eq!(a.layer_bits()[0], 16);
    let cut = win().local_bytes_at(g, n, Bits::B8) + a.floor_bytes(4) / 2;
    a.set_total_budget(cut, None, 4).unwrap();
    assert!(a.true_bytes() <= cut);
    let bits = a.layer_bits();
    assert!(bits[0] <= 8 && bits[2] == bits[0], "{bits:?}");
    assert!(a.requantizations() > 0);
    // the lowered windows still attend over the right tokens: close to the f16 store
    let mut f = fp16_store(n);
    run(f.as_mut(), &[40, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 11);
    let (oa, of) = (run(a.as_mut(), &[1], 12), run(f.as_mut(), &[1], 12));
    let err = oa[0][0]
        .iter()
        .zip(&of[0][0])
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 0.1, "lowered window output off by {err}");
    let mut bytes = Vec::new();
    a.spill_to(&mut bytes).unwrap();
    let mut b = MethodSpec::plain("pmkvq".parse().unwrap(), None, "pmkvq")
        .new_store_in(g, Some(&win()), n)
        .unwrap();
    b.restore(&bytes).unwrap();
    assert_eq!((b.layer_bits(), b.true_bytes()), (a.layer_bits(), a.true_bytes()));
    assert_eq!(run(a.as_mut(), &[1, 2], 13), run(b.as_mut(), &[1, 2], 13));
}

#[test]
fn a_fixed_width_method_holds_its_windows_at_its_width() {
    let g = geom();
    let n = 300;
    for (method, bits) in [("kivi:2", 2), ("rtn:4", 4), ("q8_0", 8), ("fp16", 16)] {
        let mut s = MethodSpec::plain(method.parse().unwrap(), None, method)
            .new_store_in(g, Some(&win()), n)
            .unwrap();
        run(s.as_mut(), &[30, 1, 1, 1], 5);
        let b = s.layer_bits();
        assert_eq!((b[0], b[2]), (bits, bits), "{method}: {b:?}");
        // and cost less than f16 windows do
        let mut f = fp16_store(n);
        run(f.as_mut(), &[30, 1, 1, 1], 5);
        assert!(
            bits == 16 || s.true_bytes() < f.true_bytes(),
            "{method}: {} bytes",
            s.true_bytes()
        );
    }
}
