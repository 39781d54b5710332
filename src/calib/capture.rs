//! KV stores used only by calibration: pre-attention fake quantization of chosen layers (spec §5.4's "RTN
//! before attention", also the perturbation sensitivity is measured with) and max-|K| statistics per rotary pair.

use crate::kvcache::quant::{Bits, OffsetMode, PackedRows, ShiftMode};
use crate::kvcache::{F32KvStore, KvGeometry, KvTap, Tapped};
use crate::model::RopeLayout;

/// Rounds the chosen layers' K and V through the PM-KVQ quantizer at a given width — every token, the current
/// one included — before attention. A value takes the store's own path to that width: quantized at 16 bits,
/// then lowered by `shift` (so with [`ShiftMode::Fitted`] the 2-bit width is the fitted floor the store holds).
pub struct FakeQuant {
    /// Width per layer for K and for V; `None` = full precision.
    bits: Vec<(Option<Bits>, Option<Bits>)>,
    group: usize,
    shift: ShiftMode,
}

/// A full-precision store whose chosen layers see quantized K/V.
pub type FakeQuantStore = Tapped<FakeQuant>;

impl Tapped<FakeQuant> {
    pub fn new(geom: KvGeometry, bits: Vec<Option<Bits>>, max_tokens: usize, shift: ShiftMode) -> Self {
        Self::sides(geom, bits.into_iter().map(|b| (b, b)).collect(), max_tokens, shift)
    }
    /// K and V quantized at their own widths.
    pub fn sides(
        geom: KvGeometry,
        bits: Vec<(Option<Bits>, Option<Bits>)>,
        max_tokens: usize,
        shift: ShiftMode,
    ) -> Self {
        Tapped::wrap(
            Box::new(F32KvStore::new(geom, max_tokens)),
            FakeQuant {
                bits,
                group: geom.head_dim,
                shift,
            },
            "+fake-quant",
        )
    }
}

impl FakeQuant {
    fn round(&self, b: Option<Bits>, x: &[f32]) -> Option<Vec<f32>> {
        let b = b?;
        let mut out = x.to_vec();
        let mut rows = PackedRows::new(Bits::B16, self.group, 1, self.group, OffsetMode::Stored);
        for g in out.chunks_exact_mut(self.group) {
            rows.clear();
            rows.bits = Bits::B16;
            rows.push_token(g);
            rows.shrink_to(b, self.shift);
            rows.dequantize_token(0, g);
        }
        Some(out)
    }
}

impl KvTap for FakeQuant {
    fn key(&mut self, layer: usize, _g: &KvGeometry, k: &[f32]) -> Option<Vec<f32>> {
        self.round(self.bits.get(layer)?.0, k)
    }
    fn value(&mut self, layer: usize, _g: &KvGeometry, v: &[f32]) -> Option<Vec<f32>> {
        self.round(self.bits.get(layer)?.1, v)
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

/// Records, per layer, KV head and rotary pair, the largest |K| seen on either channel of the pair (spec §5.3).
pub struct KeyStats {
    pairs: Vec<(usize, usize)>,
    /// `[layer][kv_head·(d/2) + pair]`.
    pub max_abs: Vec<Vec<f32>>,
}

/// A full-precision store that collects key statistics.
pub type KeyStatsStore = Tapped<KeyStats>;

impl Tapped<KeyStats> {
    pub fn new(geom: KvGeometry, layout: RopeLayout, max_tokens: usize) -> Self {
        let tap = KeyStats {
            pairs: rotary_pairs(layout, geom.head_dim),
            max_abs: vec![vec![0.0; geom.kv_heads * geom.head_dim / 2]; geom.layers],
        };
        Tapped::wrap(Box::new(F32KvStore::new(geom, max_tokens)), tap, "+key-stats")
    }

    /// Continue collecting into existing statistics (several samples, one store each).
    pub fn with_stats(mut self, stats: Vec<Vec<f32>>) -> Self {
        self.tap.max_abs = stats;
        self
    }
}

impl KvTap for KeyStats {
    fn key(&mut self, layer: usize, g: &KvGeometry, k: &[f32]) -> Option<Vec<f32>> {
        let (d, half) = (g.head_dim, g.head_dim / 2);
        let m = self.max_abs.get_mut(layer)?;
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
        None
    }
}
