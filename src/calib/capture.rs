//! KV stores used only by calibration: pre-attention fake quantization of chosen layers (spec §5.4's "RTN
//! before attention", also the perturbation sensitivity is measured with) and max-|K| statistics per rotary pair.

use crate::kvcache::quant::{quantize_group, Bits};
use crate::kvcache::{F32KvStore, KvError, KvGeometry, KvStore};
use crate::model::RopeLayout;

/// Full-precision store whose chosen layers see their K and V rounded through the PM-KVQ quantizer at a given
/// width — every token, the current one included — before attention.
pub struct FakeQuantStore {
    inner: F32KvStore,
    /// Width per layer; `None` = full precision.
    bits: Vec<Option<Bits>>,
    group: usize,
}

impl FakeQuantStore {
    pub fn new(geom: KvGeometry, bits: Vec<Option<Bits>>, max_tokens: usize) -> Self {
        FakeQuantStore {
            inner: F32KvStore::new(geom, max_tokens),
            bits,
            group: geom.head_dim,
        }
    }

    fn round(&self, layer: usize, x: &[f32]) -> Vec<f32> {
        let Some(b) = self.bits.get(layer).copied().flatten() else {
            return x.to_vec();
        };
        let mut out = x.to_vec();
        let mut codes = vec![0u16; self.group];
        for g in out.chunks_exact_mut(self.group) {
            let p = quantize_group(g, b, &mut codes);
            for (v, &c) in g.iter_mut().zip(&codes) {
                *v = c as f32 * p.scale + p.offset;
            }
        }
        out
    }
}

impl KvStore for FakeQuantStore {
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
        let (kq, vq) = (self.round(layer, k), self.round(layer, v));
        self.inner.attend_and_store(layer, q, &kq, &vq, n, out)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        let (kq, vq) = (self.round(layer, k), self.round(layer, v));
        self.inner.append(layer, &kq, &vq, n)
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
    fn method(&self) -> String {
        "fake-quant".into()
    }
}

/// Channel index pairs that RoPE rotates together, in the model's layout.
pub fn rotary_pairs(layout: RopeLayout, d: usize) -> Vec<(usize, usize)> {
    (0..d / 2)
        .map(|j| match layout {
            RopeLayout::Interleaved => (2 * j, 2 * j + 1),
            RopeLayout::Neox => (j, j + d / 2),
        })
        .collect()
}

/// Expand per-pair scales `[kv_head][pair]` to per-channel scales `[kv_head·d + c]` (both channels of a pair
/// share one scale, so the scaling commutes with the rotation: spec §5.3).
pub fn expand_pair_scales(pair_scales: &[f32], kv_heads: usize, d: usize, layout: RopeLayout) -> Vec<f32> {
    let pairs = rotary_pairs(layout, d);
    let mut out = vec![1.0f32; kv_heads * d];
    for h in 0..kv_heads {
        for (j, &(a, b)) in pairs.iter().enumerate() {
            let s = pair_scales[h * d / 2 + j];
            out[h * d + a] = s;
            out[h * d + b] = s;
        }
    }
    out
}

/// Full-precision store that records, per layer, KV head and rotary pair, the largest |K| seen on either
/// channel of the pair (spec §5.3).
pub struct KeyStatsStore {
    inner: F32KvStore,
    pairs: Vec<(usize, usize)>,
    /// `[layer][kv_head·(d/2) + pair]`.
    pub max_abs: Vec<Vec<f32>>,
}

impl KeyStatsStore {
    pub fn new(geom: KvGeometry, layout: RopeLayout, max_tokens: usize) -> Self {
        KeyStatsStore {
            inner: F32KvStore::new(geom, max_tokens),
            pairs: rotary_pairs(layout, geom.head_dim),
            max_abs: vec![vec![0.0; geom.kv_heads * geom.head_dim / 2]; geom.layers],
        }
    }

    /// Continue collecting into existing statistics (several samples, one store each).
    pub fn with_stats(mut self, stats: Vec<Vec<f32>>) -> Self {
        self.max_abs = stats;
        self
    }

    fn record(&mut self, layer: usize, k: &[f32]) {
        let g = self.inner.geometry();
        let (d, half) = (g.head_dim, g.head_dim / 2);
        let m = &mut self.max_abs[layer];
        for tok in k.chunks_exact(g.kv_dim()) {
            for (h, head) in tok.chunks_exact(d).enumerate() {
                for (j, &(a, b)) in self.pairs.iter().enumerate() {
                    let v = head[a].abs().max(head[b].abs());
                    let slot = &mut m[h * half + j];
                    if v > *slot {
                        *slot = v;
                    }
                }
            }
        }
    }
}

impl KvStore for KeyStatsStore {
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
        if layer < self.max_abs.len() {
            self.record(layer, k);
        }
        self.inner.attend_and_store(layer, q, k, v, n, out)
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        if layer < self.max_abs.len() {
            self.record(layer, k);
        }
        self.inner.append(layer, k, v, n)
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
    fn method(&self) -> String {
        "key-stats".into()
    }
}
