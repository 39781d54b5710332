//! Rotation of what the cache stores (issue 15): per layer and head, post-RoPE queries, keys and values are
//! multiplied by an orthogonal `R = H·D/√n` (`D` random ±1 signs seeded per layer, `H` the Walsh–Hadamard matrix
//! over blocks of `n`, the largest power of two dividing the head dimension, at most 256), and the attention
//! output by `Rᵀ = D·H/√n` once. Scores are unchanged, `(Rq)·(Rk) = q·k`, and the output is a weighted sum of
//! rotated values, so `Rᵀ` of it is the unrotated output: exact without quantization. With it, one outlier
//! channel is spread over the whole block, so a quantization group's range follows the typical magnitude instead
//! of the outlier's. llama.cpp does the same with `H/√n` alone (PR #21038); the signs keep a vector that happens
//! to be aligned with a Hadamard row (a constant run, an alternating one) from collapsing into one channel.
//!
//! Composition with the key reparameterization: `KeyScaled` wraps a rotated store, so keys are divided by the
//! calibrated scales first and rotated after (`R(k/λ)·R(qλ) = q·k`). The scales were calibrated on unrotated
//! keys and flatten the outlier channels; the rotation then spreads what is left.

use super::tap::{KvTap, Tapped};
use super::{KvError, KvGeometry, KvStore};

/// The seed every rotation derives its per-layer signs from: fixed, so a spilled rotated cache restores into any
/// store built with rotation, in this process or the next.
pub const ROTATION_SEED: u64 = 0x504d_4b56_515f_726f;

/// What a rotated store's method name gains (`pmkvq` → `pmkvq+rot`), on the host and on the device alike.
pub const ROTATED_SUFFIX: &str = "+rot";

/// The largest block the Walsh–Hadamard transform runs over.
const MAX_BLOCK: usize = 256;

/// The rotation tap: `R` on queries, keys and values, `Rᵀ` on the attention output.
pub struct Rotation {
    /// `[layer][channel]` signs (±1) of one head; every head of a layer uses the same `R`.
    signs: Vec<Vec<f32>>,
    block: usize,
    head_dim: usize,
}

/// A store whose inputs are rotated.
pub type Rotated = Tapped<Rotation>;

/// The block the transform runs over for heads of `head_dim`: the largest power of two dividing it, at most
/// [`MAX_BLOCK`]. `None` when that is 1 (an odd head dimension: nothing to rotate).
pub fn rotation_block(head_dim: usize) -> Option<usize> {
    let b = (1usize << head_dim.trailing_zeros().min(usize::BITS - 1)).min(MAX_BLOCK);
    (head_dim > 0 && b > 1).then_some(b)
}

/// The `1/√n` of a block of `n`.
pub fn rotation_scale(block: usize) -> f32 {
    1.0 / (block as f32).sqrt()
}

impl Rotation {
    pub fn new(geom: KvGeometry, seed: u64) -> Result<Self, KvError> {
        let block = rotation_block(geom.head_dim).ok_or(KvError::BadGroup {
            method: "+rot".into(),
            group: 1,
            head_dim: geom.head_dim,
        })?;
        let signs = (0..geom.layers)
            .map(|l| {
                let mut s = SplitMix(seed ^ (l as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                (0..geom.head_dim)
                    .map(|_| if s.next() >> 63 == 0 { 1.0 } else { -1.0 })
                    .collect()
            })
            .collect();
        Ok(Rotation {
            signs,
            block,
            head_dim: geom.head_dim,
        })
    }

    /// `x ← R·x` for every head in `x` (any number of tokens × heads of `head_dim`).
    pub fn forward(&self, layer: usize, x: &mut [f32]) {
        let Some(signs) = self.signs.get(layer) else { return };
        let scale = self.scale();
        for head in x.chunks_exact_mut(self.head_dim) {
            for (v, s) in head.iter_mut().zip(signs) {
                *v *= s * scale;
            }
            for blk in head.chunks_exact_mut(self.block) {
                fwht(blk);
            }
        }
    }

    /// `x ← Rᵀ·x`, the inverse of [`forward`](Self::forward).
    pub fn inverse(&self, layer: usize, x: &mut [f32]) {
        let Some(signs) = self.signs.get(layer) else { return };
        let scale = self.scale();
        for head in x.chunks_exact_mut(self.head_dim) {
            for blk in head.chunks_exact_mut(self.block) {
                fwht(blk);
            }
            for (v, s) in head.iter_mut().zip(signs) {
                *v *= s * scale;
            }
        }
    }

    pub fn block(&self) -> usize {
        self.block
    }

    /// The `1/√n` every channel is multiplied by (with its sign) — what the CUDA kernel is handed, so both sides
    /// compute it once, alike.
    pub fn scale(&self) -> f32 {
        rotation_scale(self.block)
    }

    /// Layer `layer`'s signs (±1, one per channel of a head).
    pub fn signs(&self, layer: usize) -> Option<&[f32]> {
        self.signs.get(layer).map(Vec::as_slice)
    }
}

/// In-place unnormalized Walsh–Hadamard transform of a power-of-two block (`H·x`, `H` symmetric, `H·H = n·I`).
fn fwht(x: &mut [f32]) {
    let n = x.len();
    let mut h = 1;
    while h < n {
        for pair in x.chunks_exact_mut(2 * h) {
            let (a, b) = pair.split_at_mut(h);
            for (u, w) in a.iter_mut().zip(b.iter_mut()) {
                let (p, q) = (*u, *w);
                *u = p + q;
                *w = p - q;
            }
        }
        h *= 2;
    }
}

/// SplitMix64: a small, well-mixed generator for the signs (reproducible across platforms and versions).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

impl Rotation {
    /// `R·x` as a new buffer (what a tap hands on).
    fn rotated(&self, layer: usize, x: &[f32]) -> Option<Vec<f32>> {
        let mut out = x.to_vec();
        self.forward(layer, &mut out);
        Some(out)
    }
}

impl KvTap for Rotation {
    fn query(&self, layer: usize, _g: &KvGeometry, q: &[f32]) -> Option<Vec<f32>> {
        self.rotated(layer, q)
    }
    fn key(&mut self, layer: usize, _g: &KvGeometry, k: &[f32]) -> Option<Vec<f32>> {
        self.rotated(layer, k)
    }
    fn value(&mut self, layer: usize, _g: &KvGeometry, v: &[f32]) -> Option<Vec<f32>> {
        self.rotated(layer, v)
    }
    fn output(&self, layer: usize, _g: &KvGeometry, out: &mut [f32]) {
        self.inverse(layer, out);
    }
}

impl Tapped<Rotation> {
    /// `inner` with rotated inputs; its method name gains `+rot`.
    pub fn rotate(inner: Box<dyn KvStore>, seed: u64) -> Result<Self, KvError> {
        let tap = Rotation::new(inner.geometry(), seed)?;
        Ok(Tapped::wrap(inner, tap, ROTATED_SUFFIX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvcache::{F32KvStore, KvMethod, MethodSpec};

    fn geom(head_dim: usize) -> KvGeometry {
        KvGeometry {
            layers: 2,
            q_heads: 4,
            kv_heads: 2,
            head_dim,
        }
    }

    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = SplitMix(seed);
        (0..n)
            .map(|_| (s.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
            .collect()
    }

    #[test]
    fn blocks_are_the_largest_power_of_two_dividing_the_head() {
        assert_eq!(rotation_block(64), Some(64));
        assert_eq!(rotation_block(128), Some(128));
        assert_eq!(rotation_block(96), Some(32));
        assert_eq!(rotation_block(80), Some(16));
        assert_eq!(rotation_block(512), Some(256));
        assert_eq!(rotation_block(7), None);
        assert_eq!(rotation_block(0), None);
    }

    #[test]
    fn rotation_is_orthogonal_and_inverted_exactly() {
        for d in [64, 96, 128, 80] {
            let r = Rotation::new(geom(d), ROTATION_SEED).unwrap();
            let x = noise(3 * d, d as u64);
            let mut y = x.clone();
            r.forward(1, &mut y);
            let norm = |v: &[f32]| v.iter().map(|a| (*a as f64).powi(2)).sum::<f64>();
            assert!((norm(&x) - norm(&y)).abs() < 1e-4 * norm(&x), "d={d}: norm changed");
            assert!(
                x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3),
                "d={d}: nothing rotated"
            );
            // a dense matrix built column by column agrees with the fast transform and is orthogonal
            let cols: Vec<Vec<f32>> = (0..d)
                .map(|c| {
                    let mut e = vec![0.0; d];
                    e[c] = 1.0;
                    r.forward(0, &mut e);
                    e
                })
                .collect();
            for (i, a) in cols.iter().enumerate() {
                for (j, b) in cols.iter().enumerate() {
                    let dot: f32 = a.iter().zip(b).map(|(p, q)| p * q).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-5, "d={d}: columns {i},{j} dot {dot}");
                }
            }
            r.inverse(1, &mut y);
            for (a, b) in x.iter().zip(&y) {
                assert!((a - b).abs() < 1e-5, "d={d}: inverse {a} vs {b}");
            }
        }
    }

    #[test]
    fn layers_get_different_signs_and_the_seed_reproduces_them() {
        let a = Rotation::new(geom(64), ROTATION_SEED).unwrap();
        let b = Rotation::new(geom(64), ROTATION_SEED).unwrap();
        assert_eq!(a.signs, b.signs);
        assert_ne!(a.signs[0], a.signs[1]);
        assert!(a.signs[0].iter().any(|s| *s > 0.0) && a.signs[0].iter().any(|s| *s < 0.0));
    }

    /// Without quantization a rotated store attends exactly as the plain one (both decode and prefill).
    #[test]
    fn rotated_f32_store_attends_like_the_plain_one() {
        let g = geom(64);
        let mut plain = F32KvStore::new(g, 64);
        let mut rot = Rotated::rotate(Box::new(F32KvStore::new(g, 64)), ROTATION_SEED).unwrap();
        assert_eq!(rot.method(), "fp32+rot");
        for (step, n) in [5usize, 1, 1, 3].into_iter().enumerate() {
            for layer in 0..g.layers {
                let seed = (step * 10 + layer) as u64;
                let q = noise(n * g.q_dim(), seed);
                let k = noise(n * g.kv_dim(), seed + 100);
                let v = noise(n * g.kv_dim(), seed + 200);
                let (mut a, mut b) = (vec![0.0; n * g.q_dim()], vec![0.0; n * g.q_dim()]);
                plain.attend_and_store(layer, &q, &k, &v, n, &mut a).unwrap();
                rot.attend_and_store(layer, &q, &k, &v, n, &mut b).unwrap();
                for (x, y) in a.iter().zip(&b) {
                    assert!((x - y).abs() < 1e-5, "step {step} layer {layer}: {x} vs {y}");
                }
            }
        }
    }

    /// On keys with an outlier channel, rotation lowers q4_0's attention error (what it is for).
    #[test]
    fn rotation_lowers_q4_0_error_on_outlier_keys() {
        let g = KvGeometry {
            layers: 1,
            q_heads: 2,
            kv_heads: 1,
            head_dim: 64,
        };
        let n = 96;
        let mut k = noise(n * 64, 1);
        for t in 0..n {
            k[t * 64 + 5] *= 40.0;
        }
        let v = noise(n * 64, 2);
        let q = noise(n * g.q_dim(), 3);
        let run = |rotate: bool| {
            let spec = MethodSpec {
                rotate,
                ..MethodSpec::plain(KvMethod::Llama(crate::kvcache::quant::Bits::B4), None, "q4_0")
            };
            let mut s = spec.new_store(g, n).unwrap();
            let mut out = vec![0.0; n * g.q_dim()];
            s.attend_and_store(0, &q, &k, &v, n, &mut out).unwrap();
            out
        };
        let mut exact = F32KvStore::new(g, n);
        let mut want = vec![0.0; n * g.q_dim()];
        exact.attend_and_store(0, &q, &k, &v, n, &mut want).unwrap();
        let err = |o: &[f32]| o.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum::<f32>();
        let (plain, rotated) = (err(&run(false)), err(&run(true)));
        assert!(rotated < 0.5 * plain, "rotated error {rotated} vs plain {plain}");
    }
}
