//! One local layer's window: its K and V sides, f16 values or packed codes once lowered, and the bounds it holds.

use crate::kvcache::quant::rows::{OffsetMode, PackedRows};
use crate::kvcache::quant::{Bits, ShiftMode};
use crate::kvcache::KvGeometry;
use half::f16;

/// One side (K or V) of a window, token-major: f16 values, or packed codes once the window was lowered.
pub(super) enum Side {
    F16(Vec<f16>),
    Packed(PackedRows),
}

impl Side {
    pub(super) fn bytes(&self) -> usize {
        match self {
            Side::F16(v) => v.len() * 2,
            Side::Packed(p) => p.true_bytes(),
        }
    }
    /// Append tokens (`kv_dim` values each); an f16 buffer never grows past `cap` values by doubling (the
    /// buffer is the window's whole cost).
    pub(super) fn push(&mut self, x: &[f32], kv_dim: usize, cap: usize) {
        match self {
            Side::F16(v) => {
                if v.len() + x.len() > v.capacity() {
                    let want = (v.len() + x.len())
                        .max(v.capacity() * 2)
                        .min(cap.max(v.len() + x.len()));
                    v.reserve_exact(want - v.len());
                }
                v.extend(x.iter().map(|&a| f16::from_f32(a)));
            }
            Side::Packed(p) => x.chunks_exact(kv_dim).for_each(|t| p.push_token(t)),
        }
    }
    pub(super) fn drop_front(&mut self, tokens: usize, kv_dim: usize) {
        match self {
            Side::F16(v) => {
                v.drain(..tokens * kv_dim);
            }
            Side::Packed(p) => *p = p.split_off(tokens),
        }
    }
    pub(super) fn truncate(&mut self, tokens: usize, kv_dim: usize) {
        match self {
            Side::F16(v) => v.truncate(tokens * kv_dim),
            Side::Packed(p) => p.truncate(tokens),
        }
    }
    /// Tokens `from..` as f16 values into `out` (packed ones dequantized).
    pub(super) fn extend_f16(&self, from: usize, kv_dim: usize, out: &mut Vec<f16>) {
        match self {
            Side::F16(v) => out.extend_from_slice(&v[from * kv_dim..]),
            Side::Packed(p) => {
                let mut row = vec![0f32; kv_dim];
                for t in from..p.len() {
                    p.dequantize_token(t, &mut row);
                    out.extend(row.iter().map(|&a| f16::from_f32(a)));
                }
            }
        }
    }
    /// Lower to `bits`: f16 values are quantized once (PM-KVQ's quantizer, a group per head), packed codes shift.
    pub(super) fn lower(&mut self, bits: Bits, geom: KvGeometry) {
        match self {
            Side::F16(v) => {
                let mut p = PackedRows::new(bits, geom.head_dim, geom.kv_heads, geom.head_dim, OffsetMode::Stored);
                let mut row = Vec::with_capacity(geom.kv_dim());
                for t in v.chunks_exact(geom.kv_dim()) {
                    row.clear();
                    row.extend(t.iter().map(|x| x.to_f32()));
                    p.push_token(&row);
                }
                *self = Side::Packed(p);
            }
            Side::Packed(p) => {
                p.shrink_to(bits, ShiftMode::Equivalent);
            }
        }
    }
}

/// One local layer: positions `first..len`.
pub(super) struct Ring {
    pub(super) k: Side,
    pub(super) v: Side,
    pub(super) first: usize,
    pub(super) len: usize,
}

impl Side {
    /// An empty side at `bits` (16: f16 values).
    pub(super) fn at(bits: Bits, geom: KvGeometry) -> Side {
        match bits {
            Bits::B16 => Side::F16(Vec::new()),
            b => Side::Packed(PackedRows::new(
                b,
                geom.head_dim,
                geom.kv_heads,
                geom.head_dim,
                OffsetMode::Stored,
            )),
        }
    }
}

impl Ring {
    /// An empty window stored at `bits`.
    pub(super) fn at(bits: Bits, geom: KvGeometry) -> Ring {
        Ring {
            k: Side::at(bits, geom),
            v: Side::at(bits, geom),
            first: 0,
            len: 0,
        }
    }

    /// Drop positions before `from` (which must be held or past the end).
    pub(super) fn drop_before(&mut self, from: usize, kv_dim: usize) {
        let from = from.min(self.len);
        if from > self.first {
            self.k.drop_front(from - self.first, kv_dim);
            self.v.drop_front(from - self.first, kv_dim);
            self.first = from;
        }
    }
}
