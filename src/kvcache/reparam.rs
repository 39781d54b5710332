//! Key reparameterization at run time (spec §5.5, §11): per layer, per KV head and channel, keys are divided by
//! λ and the queries that read them multiplied by λ, right after RoPE. q·k is unchanged in exact arithmetic;
//! only the keys the quantizer sees are flattened. Wrapping a store keeps this outside the model and works for
//! quantized weights, where the scales cannot be folded into the projections.

use super::tap::{KvTap, Tapped};
use super::{KvError, KvGeometry, KvStore};
use std::sync::Arc;

/// Per-layer channel scales `λ̃[kv_head·d + c]`, one scale per rotary pair repeated on both of its channels.
pub type KeyScales = Arc<Vec<Vec<f32>>>;

/// Per layer, the reciprocals `1/λ` keys are multiplied by (rather than divided, on the hot path).
pub fn inverse_scales(scales: &[Vec<f32>]) -> Vec<Vec<f32>> {
    scales.iter().map(|l| l.iter().map(|&x| 1.0 / x).collect()).collect()
}

/// `k ← k ∘ inv` for every token row of `k` (`inv`: one layer's `1/λ`, `kv_dim` long).
pub fn scale_keys(inv: &[f32], k: &mut [f32]) {
    for tok in k.chunks_exact_mut(inv.len()) {
        for (x, s) in tok.iter_mut().zip(inv) {
            *x *= s;
        }
    }
}

/// The key-scaling tap: queries × λ, keys × 1/λ.
pub struct KeyScale {
    scales: KeyScales,
    /// Reciprocals, so keys are multiplied rather than divided on the hot path.
    inv: Vec<Vec<f32>>,
}

/// A store whose keys are reparameterized.
pub type KeyScaled = Tapped<KeyScale>;

impl Tapped<KeyScale> {
    pub fn new(inner: Box<dyn KvStore>, scales: KeyScales, label: &str) -> Result<Self, KvError> {
        let g = inner.geometry();
        if scales.len() != g.layers {
            return Err(KvError::BadBudgets {
                what: "key scales",
                expected: g.layers,
                got: scales.len(),
            });
        }
        if let Some(bad) = scales.iter().find(|s| s.len() != g.kv_dim()) {
            return Err(KvError::BadShape {
                layer: 0,
                expected: g.kv_dim(),
                got: bad.len(),
            });
        }
        let inv = inverse_scales(&scales);
        Ok(Tapped::wrap(inner, KeyScale { scales, inv }, label))
    }
}

impl KvTap for KeyScale {
    fn query(&self, layer: usize, g: &KvGeometry, q: &[f32]) -> Option<Vec<f32>> {
        let lam = self.scales.get(layer)?;
        let (d, group) = (g.head_dim, g.group());
        let mut out = q.to_vec();
        for tok in out.chunks_exact_mut(g.q_dim()) {
            for (h, head) in tok.chunks_exact_mut(d).enumerate() {
                let kvh = h / group;
                for (x, s) in head.iter_mut().zip(&lam[kvh * d..(kvh + 1) * d]) {
                    *x *= s;
                }
            }
        }
        Some(out)
    }

    fn key(&mut self, layer: usize, _g: &KvGeometry, k: &[f32]) -> Option<Vec<f32>> {
        let inv = self.inv.get(layer)?;
        let mut out = k.to_vec();
        scale_keys(inv, &mut out);
        Some(out)
    }
}
