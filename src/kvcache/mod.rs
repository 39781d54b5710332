//! KV storage and attention over it.
//!
//! Owns: every sequence's K/V state, the attention computed over that state (`attention/`: the packed-code
//! kernels and the one per-head segment loop), and its byte accounting (`quant/rows.rs::token_bytes`).
//! Does not own: requests, budget policy, gRPC or tokio. The model hands each layer's post-RoPE Q/K/V for the
//! new tokens to a [`KvStore`] and gets the attention output back, so a store can keep K/V in any precision
//! without the model knowing: the f16/f32 reference stores, PM-KVQ's progressive packed store
//! ([`PmkvqStore`], which also runs the fixed-width RTN and llama.cpp q8_0/q4_0 baselines) and KIVI.
//!
//! Invariants: tokens are stored in chronological order; the new tokens of a call attend to every stored token
//! plus the new tokens up to themselves (causal); a token's own K/V are used unquantized in its own step and
//! stored only after attention (spec §3.3).

pub mod attention;
pub mod kivi;
pub mod method;
mod pmkvq;
pub mod quant;
mod reference;
pub mod reparam;
pub mod rotate;
pub mod spill;
pub mod tap;
pub mod window;

pub use method::{KvExtensions, KvMethod, MethodSpec};
/// The run-time width plan's sensitivity table and levels (for profiles and tools).
pub mod pmkvq_plan {
    pub use super::pmkvq::{knapsack, level, Sensitivity, LEVELS, UNIFORM_ROW};
}
pub use pmkvq::{
    read_spill, split_total_budget, write_spill, PmkvqConfig, PmkvqStore, Quantizer, SpillLayers, SpilledLayer,
};
pub use reference::{F16KvStore, F32KvStore, RefElem, RefKvStore};
pub use reparam::{KeyScaled, KeyScales};
pub use rotate::{Rotated, ROTATION_SEED};
pub use tap::{KvTap, Tapped};
pub use window::{fp16_bytes, pmkvq_floor, pmkvq_floor_with, Windowed, Windowing};

/// Shape of the KV state of one sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvGeometry {
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvGeometry {
    pub fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    pub fn q_dim(&self) -> usize {
        self.q_heads * self.head_dim
    }
    /// Query heads sharing one KV head (GQA group size).
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KvError {
    #[error("kv cache for layer {layer} holds {stored} tokens, limit is {limit}")]
    CapacityExceeded { layer: usize, stored: usize, limit: usize },
    #[error("layer {layer} out of range (model has {layers})")]
    BadLayer { layer: usize, layers: usize },
    #[error("kv input for layer {layer}: expected {expected} values, got {got}")]
    BadShape { layer: usize, expected: usize, got: usize },
    #[error(
        "kv budget exhausted in layer {layer}: {need} bytes needed even at the {floor_bits}-bit floor, budget is {budget}"
    )]
    OutOfBudget {
        layer: usize,
        need: usize,
        budget: usize,
        floor_bits: u32,
    },
    #[error("{what} must have {expected} entries (one per layer), got {got}")]
    BadBudgets {
        what: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("the `{method}` cache cannot {what}")]
    Unsupported { what: &'static str, method: String },
    #[error("spilled kv state is corrupt: {0}")]
    Corrupt(String),
    /// Writing a spill failed (a full disk, the spill quota); `kind` tells which.
    #[error("cannot write the spill: {msg}")]
    Spill { kind: std::io::ErrorKind, msg: String },
    #[error(
        "the `{method}` cache quantizes groups of {group} values, which must be a multiple of 4 dividing the head \
         dimension {head_dim} (a group that divides it, or the fp16 cache)"
    )]
    BadGroup {
        method: String,
        group: usize,
        head_dim: usize,
    },
}

impl From<std::io::Error> for KvError {
    /// A failed spill write, keeping its kind (a full disk, the spill quota).
    fn from(e: std::io::Error) -> Self {
        KvError::Spill {
            kind: e.kind(),
            msg: e.to_string(),
        }
    }
}

/// One sequence's KV state, all layers.
pub trait KvStore: Send {
    fn geometry(&self) -> KvGeometry;
    /// Tokens stored for `layer` (equal across layers between forward passes).
    fn len(&self, layer: usize) -> usize;
    fn is_empty(&self) -> bool {
        self.len(0) == 0
    }
    /// Attention of `n` new tokens over the stored tokens and themselves (causal), then store their K/V.
    /// `q`: `n × q_heads × d`, `k`/`v`: `n × kv_heads × d` (post-RoPE), `out`: `n × q_heads × d`.
    fn attend_and_store(
        &mut self,
        layer: usize,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        n: usize,
        out: &mut [f32],
    ) -> Result<(), KvError>;
    /// Store `n` tokens' K/V (`n × kv_heads × d`, post-RoPE) in `layer` without attending (restoring a spilled
    /// sequence, filling a benchmark).
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError>;
    /// Forget every stored token.
    fn clear(&mut self);
    /// Keep only the first `tokens` stored tokens of every layer (rollback after a speculative or benchmark step).
    fn truncate(&mut self, tokens: usize);
    /// Bytes held: payload plus scales, offsets and bookkeeping.
    fn true_bytes(&self) -> usize;
    /// Bytes of codes only (the reference implementation's accounting, spec §3.5).
    fn payload_bytes(&self) -> usize {
        self.true_bytes()
    }
    /// Check that `n` more tokens can be stored in every layer (capacity, budget at the precision floor) before
    /// a forward pass touches any layer, so a refused step leaves every layer as it was.
    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        let _ = n;
        Ok(())
    }
    /// Current storage bit-width of each layer's body (16 for an f16 cache).
    fn layer_bits(&self) -> Vec<u32> {
        vec![16; self.geometry().layers]
    }
    /// Each layer's K and V body widths (they differ where widths are planned on the K/V sensitivity).
    fn layer_kv_bits(&self) -> Vec<[u32; 2]> {
        self.layer_bits().into_iter().map(|b| [b, b]).collect()
    }
    /// Set per-layer budgets in true bytes; a layer over its new budget shrinks now, before the next attention.
    /// Stores without adaptive precision only check that what they hold fits.
    fn set_layer_budgets(&mut self, budgets: &[usize]) -> Result<(), KvError> {
        let _ = budgets;
        Ok(())
    }
    /// Short name of the method (`fp16`, `pmkvq`, `rtn:2`, ...).
    fn method(&self) -> String;
    /// The smallest true bytes this store can hold what it has plus `ahead` more tokens in: every body at its
    /// floor width for adaptive stores, what it will hold for fixed-width ones. The default is an upper bound
    /// (new tokens at 16 bits).
    fn floor_bytes(&self, ahead: usize) -> usize {
        let g = self.geometry();
        self.true_bytes() + ahead * 2 * g.kv_dim() * 2 * g.layers
    }
    /// Bind the whole cache to `total` true bytes, split over layers by `shares` (equal without), each layer
    /// first getting its floor for `ahead` more tokens; shrinks now. Fails only when `total` is below
    /// [`floor_bytes`](Self::floor_bytes)`(ahead)`.
    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        let _ = shares;
        let need = self.floor_bytes(ahead);
        if need > total {
            return Err(KvError::OutOfBudget {
                layer: 0,
                need,
                budget: total,
                floor_bits: self.layer_bits().into_iter().min().unwrap_or(16),
            });
        }
        Ok(())
    }
    /// Everything the store holds, serialized bit-exactly into `out` as it is read (preemption streams it to a
    /// file: no second copy of the cache is made in memory).
    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let _ = out;
        Err(KvError::Unsupported {
            what: "be spilled",
            method: self.method(),
        })
    }
    /// [`spill_to`](Self::spill_to) into memory (tests and tools).
    fn spill(&self) -> Result<Vec<u8>, KvError> {
        let mut v = Vec::new();
        self.spill_to(&mut v)?;
        Ok(v)
    }
    /// Load what [`spill`](Self::spill) wrote into this (empty, identically configured) store.
    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let _ = data;
        Err(KvError::Unsupported {
            what: "be restored",
            method: self.method(),
        })
    }
    /// Load a spill into this (empty, identically configured) store within `total` bytes, split as
    /// [`set_total_budget`](Self::set_total_budget) would (`ahead` tokens to come): a store that can lower
    /// precision restores at a width that fits rather than at the width it was spilled with. The default
    /// restores, then fits.
    fn restore_within(
        &mut self,
        data: &[u8],
        total: usize,
        shares: Option<&[f64]>,
        ahead: usize,
    ) -> Result<(), KvError> {
        self.restore(data)?;
        self.set_total_budget(total, shares, ahead)
    }
    /// Re-quantizations (one layer's body lowered one level) since creation.
    fn requantizations(&self) -> u64 {
        0
    }
    /// The concrete store, for a forward pass that can only run on its own kind (the GPU's device caches).
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        None
    }
    /// The sliding-window layers this store attends over windows for ([`Windowed`]); a model with such layers
    /// refuses a store without them (its local layers would see everything).
    fn windowing(&self) -> Option<&Windowing> {
        None
    }
}

/// Shape checks shared by every store.
pub fn check_inputs(
    g: &KvGeometry,
    layer: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    n: usize,
    out: &[f32],
) -> Result<(), KvError> {
    if layer >= g.layers {
        return Err(KvError::BadLayer {
            layer,
            layers: g.layers,
        });
    }
    for (len, want) in [
        (q.len(), n * g.q_dim()),
        (k.len(), n * g.kv_dim()),
        (v.len(), n * g.kv_dim()),
        (out.len(), n * g.q_dim()),
    ] {
        if len != want {
            return Err(KvError::BadShape {
                layer,
                expected: want,
                got: len,
            });
        }
    }
    Ok(())
}

/// Shape checks for `append`.
pub fn check_append(g: &KvGeometry, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
    if layer >= g.layers {
        return Err(KvError::BadLayer {
            layer,
            layers: g.layers,
        });
    }
    let want = n * g.kv_dim();
    if k.len() != want || v.len() != want {
        return Err(KvError::BadShape {
            layer,
            expected: want,
            got: if k.len() != want { k.len() } else { v.len() },
        });
    }
    Ok(())
}

/// Implements the bookkeeping [`KvStore`] methods (geometry, lengths, bytes, budgets, spill and restore,
/// re-quantizations) by forwarding to `$inner` (an expression of `self`), for stores that wrap another. The
/// wrapper writes what it may change itself: `attend_and_store`, `append`, `method`, and `as_any_mut` (a
/// wrapper that forwarded it would let a backend downcast past it).
macro_rules! forward_kv_store {
    ($s:ident => $inner:expr) => {
        fn geometry(&$s) -> $crate::kvcache::KvGeometry {
            $inner.geometry()
        }
        fn len(&$s, layer: usize) -> usize {
            $inner.len(layer)
        }
        fn clear(&mut $s) {
            $inner.clear()
        }
        fn truncate(&mut $s, tokens: usize) {
            $inner.truncate(tokens)
        }
        fn true_bytes(&$s) -> usize {
            $inner.true_bytes()
        }
        fn payload_bytes(&$s) -> usize {
            $inner.payload_bytes()
        }
        fn reserve(&mut $s, n: usize) -> Result<(), $crate::kvcache::KvError> {
            $inner.reserve(n)
        }
        fn layer_bits(&$s) -> Vec<u32> {
            $inner.layer_bits()
        }
        fn layer_kv_bits(&$s) -> Vec<[u32; 2]> {
            $inner.layer_kv_bits()
        }
        fn set_layer_budgets(&mut $s, budgets: &[usize]) -> Result<(), $crate::kvcache::KvError> {
            $inner.set_layer_budgets(budgets)
        }
        fn floor_bytes(&$s, ahead: usize) -> usize {
            $inner.floor_bytes(ahead)
        }
        fn set_total_budget(
            &mut $s,
            total: usize,
            shares: Option<&[f64]>,
            ahead: usize,
        ) -> Result<(), $crate::kvcache::KvError> {
            $inner.set_total_budget(total, shares, ahead)
        }
        fn spill_to(&$s, out: &mut dyn std::io::Write) -> Result<(), $crate::kvcache::KvError> {
            $inner.spill_to(out)
        }
        fn restore(&mut $s, data: &[u8]) -> Result<(), $crate::kvcache::KvError> {
            $inner.restore(data)
        }
        fn restore_within(
            &mut $s,
            data: &[u8],
            total: usize,
            shares: Option<&[f64]>,
            ahead: usize,
        ) -> Result<(), $crate::kvcache::KvError> {
            $inner.restore_within(data, total, shares, ahead)
        }
        fn requantizations(&$s) -> u64 {
            $inner.requantizations()
        }
        fn windowing(&$s) -> Option<&$crate::kvcache::Windowing> {
            $inner.windowing()
        }
    };
}
pub(crate) use forward_kv_store;

/// A borrowed store is a store: the CLI's local loop runs a `Sequence` over a cache its caller keeps (to read
/// it afterwards), where the daemon's sequences own theirs. A boxed store is one too (a wrapper's inner store of
/// any method).
macro_rules! store_by_pointer {
    ($($ptr:ty),*) => {$(
        impl<S: KvStore + ?Sized> KvStore for $ptr {
            fn attend_and_store(
                &mut self,
                layer: usize,
                q: &[f32],
                k: &[f32],
                v: &[f32],
                n: usize,
                out: &mut [f32],
            ) -> Result<(), KvError> {
                (**self).attend_and_store(layer, q, k, v, n, out)
            }
            fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
                (**self).append(layer, k, v, n)
            }
            fn method(&self) -> String {
                (**self).method()
            }
            fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
                (**self).as_any_mut()
            }
            forward_kv_store!(self => (**self));
        }
    )*};
}
store_by_pointer!(&mut S, Box<S>);
