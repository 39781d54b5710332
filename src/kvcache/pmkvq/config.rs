//! PM-KVQ's store configuration: the progressive cache's defaults (spec §3) and the fixed-width baselines that
//! share its storage, and what one token costs in it.

use super::plan::Sensitivity;
use crate::kvcache::quant::rows::{token_bytes, token_payload_bytes};
use crate::kvcache::quant::{Bits, OffsetMode, ShiftMode};
use crate::kvcache::KvGeometry;
use std::sync::Arc;

/// Where a token of one side of a layer sits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Seg {
    /// The 16-bit sink.
    Sink,
    /// The recent window, at [`PmkvqConfig::window_bits`].
    Window,
    /// A body at this width.
    Body(Bits),
}

/// How body tokens are quantized when they are written directly (no window).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantizer {
    /// The PM-KVQ quantizer: asymmetric, float offset, per group.
    Asymmetric,
    /// llama.cpp's q8_0 / q4_0: symmetric 32-element blocks, one f16 scale each.
    LlamaSymmetric,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PmkvqConfig {
    /// Tokens kept at 16 bits at the start (spec default 1).
    pub sink: usize,
    /// Chunked recent window (spec default 128); 0 = tokens go straight to the body.
    pub window: usize,
    /// Width the window's tokens are kept at (spec: 16; 8 is near-lossless per token and costs half, so the same
    /// bytes hold twice the recent tokens). A flush lowers them to the body's width from there.
    pub window_bits: Bits,
    /// Quantization group; 0 = head_dim.
    pub group: usize,
    /// Width a body starts at.
    pub init_bits: Bits,
    /// Lowest width a body may be shrunk to.
    pub floor_bits: Bits,
    pub shift: ShiftMode,
    /// Shrink to meet budgets (PM-KVQ). Off: fixed width; budgets are only checked.
    pub adaptive: bool,
    pub quantizer: Quantizer,
    /// Enforce budgets on code bytes only, as the reference implementation does (§3.5), instead of true bytes.
    /// For parity checks; a deployment always enforces true bytes.
    pub payload_accounting: bool,
    /// llama.cpp's semantics for its quantized cache types: a step's K/V are written (quantized) before attention
    /// reads them back, and the query is rounded through q8_0 for the K·Q product (flash attention's
    /// `vec_dot_type`). Off for PM-KVQ, whose current token attends to itself unquantized (§3.3).
    pub llama_semantics: bool,
    /// Calibrated per-layer K and V sensitivity: under a total budget the store chooses every body's width by
    /// an exact knapsack on it ([`super::plan`]) instead of splitting the budget by shares. Adaptive stores only.
    pub sensitivity: Option<Arc<Sensitivity>>,
    /// The elastic window: once every body of a layer is at the floor width and the layer still does not fit,
    /// its oldest window tokens move into the body (at the floor) until it fits, instead of the sequence ending.
    /// The floor is then the 16-bit sink plus every other token at the floor width, whatever the length. The
    /// window never yields above the floor, so budgets that hold the full window behave exactly as without.
    /// Adaptive stores with a window only.
    pub elastic_window: bool,
    /// Cap the window at 1/N of an average layer's budget ([`window_for`](Self::window_for)): `window` tokens at
    /// `window_bits` until the budget binds; from then on the window is at 8 bits and keeps as many recent
    /// tokens as the share pays for, yielding the oldest to the body when a cut lowers it. A narrowed window
    /// stays narrow until the store is cleared. `None`: `window` tokens at `window_bits` whatever the budget.
    pub window_share: Option<usize>,
    pub name: String,
}

impl PmkvqConfig {
    /// The window share of PM-KVQ as shipped ([`window_share`](Self::window_share)): the paper's 128 recent
    /// tokens at 16 bits until the budget binds, then at 8 bits and at most a sixth of a layer's budget. Measured
    /// at a fifth of the fp16 bytes, recent tokens beyond a sixth starve the keys on pass-key retrieval, and below
    /// it more of them (at 8 bits) beat fewer at 16 (docs/retrieval.md).
    pub const SHIPPED_WINDOW_SHARE: usize = 6;
    /// The fewest recent tokens a capped window keeps ([`window_share`](Self::window_share)): narrower windows
    /// quantize a question before its answer reads it (docs/retrieval.md).
    pub const MIN_CAPPED_WINDOW: usize = 16;
    /// The width a capped window narrows to before it gives up tokens: 8 bits is near-lossless per token
    /// (q8_0's mean KL on the traces is 0.0005) and holds twice the recent tokens in the same bytes.
    pub const NARROW_WINDOW: Bits = Bits::B8;

    pub fn pmkvq() -> Self {
        PmkvqConfig {
            sink: 1,
            window: 128,
            window_bits: Bits::B16,
            group: 0,
            init_bits: Bits::B16,
            floor_bits: Bits::B2,
            shift: ShiftMode::Equivalent,
            adaptive: true,
            quantizer: Quantizer::Asymmetric,
            payload_accounting: false,
            llama_semantics: false,
            sensitivity: None,
            elastic_window: false,
            window_share: None,
            name: "pmkvq".into(),
        }
    }
    /// Every token quantized at `bits` when stored, per token, no sink or window ("existing methods").
    pub fn rtn(bits: Bits) -> Self {
        PmkvqConfig {
            sink: 0,
            window: 0,
            init_bits: bits,
            floor_bits: bits,
            adaptive: false,
            name: format!("rtn:{}", bits.count()),
            ..Self::pmkvq()
        }
    }
    /// Quantization group for `geom` (0 means one group per head).
    pub(super) fn group_for(&self, geom: KvGeometry) -> usize {
        if self.group == 0 {
            geom.head_dim
        } else {
            self.group
        }
    }
    /// Where body groups keep their offsets: llama.cpp's symmetric formats store none.
    pub(crate) fn body_offsets(&self) -> OffsetMode {
        match (self.quantizer, self.init_bits) {
            (Quantizer::LlamaSymmetric, Bits::B4) => OffsetMode::Symmetric { center: 8 },
            (Quantizer::LlamaSymmetric, _) => OffsetMode::Symmetric { center: 128 },
            _ => OffsetMode::Stored,
        }
    }
    /// True bytes of one token in one side (K or V) of one layer, in `seg`.
    pub(super) fn token_bytes_in(&self, geom: KvGeometry, seg: Seg) -> usize {
        let (bits, offsets) = self.seg_format(seg);
        token_bytes(bits, self.group_for(geom), geom.kv_dim(), offsets)
    }
    /// What a budget charges for one token of one side in `seg`: its true bytes, or only its codes under
    /// [`payload_accounting`](Self::payload_accounting).
    pub(super) fn charged_token_bytes(&self, geom: KvGeometry, seg: Seg) -> usize {
        let (bits, offsets) = self.seg_format(seg);
        self.charged_at(geom, bits, offsets)
    }
    /// [`charged_token_bytes`](Self::charged_token_bytes) of a token at `bits` with `offsets`.
    fn charged_at(&self, geom: KvGeometry, bits: Bits, offsets: OffsetMode) -> usize {
        if self.payload_accounting {
            token_payload_bytes(bits, self.group_for(geom), geom.kv_dim())
        } else {
            token_bytes(bits, self.group_for(geom), geom.kv_dim(), offsets)
        }
    }
    /// The width and offsets of a segment's tokens.
    fn seg_format(&self, seg: Seg) -> (Bits, OffsetMode) {
        match seg {
            Seg::Sink => (Bits::B16, OffsetMode::Stored),
            Seg::Window => (self.window_bits, OffsetMode::Stored),
            Seg::Body(bits) => (bits, self.body_offsets()),
        }
    }
    /// The width a body starts at: never above the window's, whose flushes it receives.
    pub(super) fn body_start_bits(&self) -> Bits {
        if self.window > 0 {
            self.init_bits.min(self.window_bits)
        } else {
            self.init_bits
        }
    }
    /// The window a store holding `tokens` tokens under `total` bytes keeps, in tokens and width: `window` at
    /// `window_bits`. Under a [`window_share`](Self::window_share) of 1/N, that while the budget does not bind
    /// (every token at 16 bits fits); once it binds, the window narrows to [`NARROW_WINDOW`](Self::NARROW_WINDOW)
    /// bits — with bodies lowered, a 16-bit window buys less than the key bits its bytes pay for — and holds the
    /// tokens 1/N of `total / layers` pays for at that width (within
    /// [`MIN_CAPPED_WINDOW`](Self::MIN_CAPPED_WINDOW)..=`window`).
    pub(super) fn window_for(&self, geom: KvGeometry, total: usize, tokens: usize) -> (usize, Bits) {
        let lossless =
            geom.layers * (2 * tokens * self.charged_token_bytes(geom, Seg::Sink) + super::LAYER_BOOKKEEPING);
        if self.window_share.is_none() || self.window == 0 || lossless <= total {
            return (self.window, self.window_bits);
        }
        (
            self.window_tokens_at(geom, total, self.narrow_bits()),
            self.narrow_bits(),
        )
    }
    /// The tokens a window at `bits` holds under `total` bytes ([`window_for`](Self::window_for)).
    pub(super) fn window_tokens_at(&self, geom: KvGeometry, total: usize, bits: Bits) -> usize {
        let Some(n) = self.window_share.filter(|_| self.window > 0) else {
            return self.window;
        };
        let per_token = 2 * self.charged_at(geom, bits, OffsetMode::Stored);
        let fits = total / geom.layers.max(1) / n.max(1) / per_token.max(1);
        fits.clamp(Self::MIN_CAPPED_WINDOW.min(self.window), self.window)
    }
    /// Whether a window of `bits` belongs in a store of this configuration.
    pub(super) fn window_width_ok(&self, bits: Bits) -> bool {
        bits == self.window_bits || (self.window_share.is_some() && bits == self.narrow_bits())
    }
    /// The width a capped window narrows to: [`NARROW_WINDOW`](Self::NARROW_WINDOW), or `window_bits` below it.
    fn narrow_bits(&self) -> Bits {
        Self::NARROW_WINDOW.min(self.window_bits)
    }
    /// Whether the window yields to the floor ([`elastic_window`](Self::elastic_window) on an adaptive, windowed
    /// store).
    pub fn window_yields(&self) -> bool {
        self.elastic_window && self.adaptive && self.window > 0
    }
    /// Whether a store of this configuration plans its widths on the sensitivity under a total budget.
    pub fn plans_widths(&self) -> bool {
        self.sensitivity.is_some() && self.adaptive
    }
    /// llama.cpp's `q8_0` / `q4_0` cache types: symmetric 32-element blocks.
    pub fn llama(bits: Bits) -> Self {
        PmkvqConfig {
            group: 32,
            quantizer: Quantizer::LlamaSymmetric,
            llama_semantics: true,
            name: format!("q{}_0", bits.count()),
            ..Self::rtn(bits)
        }
    }
}
