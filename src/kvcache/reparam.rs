//! Key reparameterization at run time (spec §5.5, §11): per layer, per KV head and channel, keys are divided by
//! λ and the queries that read them multiplied by λ, right after RoPE. q·k is unchanged in exact arithmetic;
//! only the keys the quantizer sees are flattened. Wrapping a store keeps this outside the model and works for
//! quantized weights, where the scales cannot be folded into the projections.

use super::{KvError, KvGeometry, KvStore};
use std::sync::Arc;

/// Per-layer channel scales `λ̃[kv_head·d + c]`, one scale per rotary pair repeated on both of its channels.
pub type KeyScales = Arc<Vec<Vec<f32>>>;

pub struct KeyScaled {
    inner: Box<dyn KvStore>,
    scales: KeyScales,
    /// Reciprocals, so keys are multiplied rather than divided on the hot path.
    inv: Vec<Vec<f32>>,
    label: String,
}

impl KeyScaled {
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
        let inv = scales.iter().map(|l| l.iter().map(|&x| 1.0 / x).collect()).collect();
        let label = format!("{}{}", inner.method(), label);
        Ok(KeyScaled {
            inner,
            scales,
            inv,
            label,
        })
    }

    fn scaled_q(&self, layer: usize, q: &[f32]) -> Vec<f32> {
        let g = self.inner.geometry();
        let (d, group, qd) = (g.head_dim, g.group(), g.q_dim());
        let lam = &self.scales[layer];
        let mut out = q.to_vec();
        for tok in out.chunks_exact_mut(qd) {
            for (h, head) in tok.chunks_exact_mut(d).enumerate() {
                let kvh = h / group;
                for (x, s) in head.iter_mut().zip(&lam[kvh * d..(kvh + 1) * d]) {
                    *x *= s;
                }
            }
        }
        out
    }

    fn scaled_k(&self, layer: usize, k: &[f32]) -> Vec<f32> {
        let inv = &self.inv[layer];
        let mut out = k.to_vec();
        for tok in out.chunks_exact_mut(inv.len()) {
            for (x, s) in tok.iter_mut().zip(inv) {
                *x *= s;
            }
        }
        out
    }
}

impl KvStore for KeyScaled {
    fn geometry(&self) -> KvGeometry {
        self.inner.geometry()
    }
    fn len(&self, layer: usize) -> usize {
        self.inner.len(layer)
    }
    fn attend_and_store(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KvError> {
        if layer >= self.scales.len() {
            return Err(KvError::BadLayer {
                layer,
                layers: self.scales.len(),
            });
        }
        let (q2, k2) = (self.scaled_q(layer, q), self.scaled_k(layer, k));
        self.inner.attend_and_store(layer, &q2, &k2, v, n, out)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        if layer >= self.scales.len() {
            return Err(KvError::BadLayer {
                layer,
                layers: self.scales.len(),
            });
        }
        let k2 = self.scaled_k(layer, k);
        self.inner.append(layer, &k2, v, n)
    }
    fn clear(&mut self) {
        self.inner.clear()
    }
    fn truncate(&mut self, tokens: usize) {
        self.inner.truncate(tokens)
    }
    fn true_bytes(&self) -> usize {
        self.inner.true_bytes()
    }
    fn payload_bytes(&self) -> usize {
        self.inner.payload_bytes()
    }
    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        self.inner.reserve(n)
    }
    fn layer_bits(&self) -> Vec<u32> {
        self.inner.layer_bits()
    }
    fn set_layer_budgets(&mut self, budgets: &[usize]) -> Result<(), KvError> {
        self.inner.set_layer_budgets(budgets)
    }
    fn method(&self) -> String {
        self.label.clone()
    }
}
