//! Sliding-window ("local") layers (Gemma 3: five local layers to one global, window 512): a local layer's
//! token at position p sees positions `p − window + 1 ..= p` only, so its cache never needs more than the last
//! `window − 1` tokens before a step. [`Windowed`] keeps those at f16 (as llama.cpp's default cache does) in a
//! small buffer per local layer whose size is bounded and independent of the trace length, and hands the global
//! layers to an inner store of any method, built over those layers only: PM-KVQ's budgets, floors, shares and
//! planned widths then cover exactly the layers whose cost grows with the trace, and the window's bounded cost is
//! set aside first.
//!
//! PM-KVQ's windows start at f16 and are lowered (16→8→4→2 by the Equivalent Right Shift, as its bodies) as far
//! as the global layers' floor for the whole sequence needs, then further when a step needs room, never below
//! its floor width and never back up; a fixed-width method keeps them at its own width (f16 for `fp16`).
//!
//! Eviction is lazy (once [`SLACK`] tokens have gone stale), so a decode step copies nothing; and a step never
//! evicts a token the step itself reads, so the last step can always be taken back ([`KvStore::truncate`]). A
//! step of more than [`SLACK`] tokens (a prefill chunk) reads the old window and its own tokens, then keeps only
//! the last `window − 1`: such a step cannot be taken back, which `truncate` reports by leaving the layer's
//! length as it was (the engine then ends that sequence rather than run it on a state no forward pass made).

use super::attention::group::{attend_layer, F16Rows, GroupOps, Heads};
use super::quant::rows::{token_bytes, OffsetMode, PackedRows};
use super::quant::Bits;
use super::{check_append, check_inputs, spill, KvError, KvGeometry, KvStore};
use half::f16;
use ring::{Ring, Side};

mod ring;

/// Stale tokens a local layer keeps before it drops them in one copy (and the largest step it can take back).
pub const SLACK: usize = 64;

/// Which layers slide, and how far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Windowing {
    /// Tokens a query sees, itself included.
    pub window: usize,
    /// `local[l]`: layer `l` is a sliding-window layer.
    pub local: Vec<bool>,
}

impl Windowing {
    /// The global layers, in order (the inner store's layer `i` is the model's `globals()[i]`).
    pub fn globals(&self) -> Vec<usize> {
        (0..self.local.len()).filter(|&l| !self.local[l]).collect()
    }
    pub fn locals(&self) -> usize {
        self.local.iter().filter(|&&l| l).count()
    }
    /// Most tokens one local layer ever holds (between and during steps of at most [`SLACK`] tokens; larger
    /// steps hold less afterwards and their own tokens only while they run).
    pub fn held_cap(&self) -> usize {
        self.window.saturating_sub(1) + 2 * SLACK
    }
    /// True bytes every local layer together holds at most over a sequence of at most `max_tokens` tokens at
    /// f16: the windows' share of any budget, set aside before the global layers get theirs — small, and
    /// constant whatever the trace length.
    pub fn local_bytes(&self, geom: KvGeometry, max_tokens: usize) -> usize {
        self.local_bytes_at(geom, max_tokens, Bits::B16)
    }
    /// [`local_bytes`](Self::local_bytes) with the windows at `bits`.
    pub fn local_bytes_at(&self, geom: KvGeometry, max_tokens: usize, bits: Bits) -> usize {
        self.locals() * max_tokens.min(self.held_cap()) * 2 * window_token_bytes(geom, bits)
    }
    /// A global-layer share vector for the inner store: the model's shares without the local layers'.
    pub fn global_shares(&self, shares: Option<&[f64]>) -> Option<Vec<f64>> {
        shares.map(|s| {
            self.globals()
                .iter()
                .map(|&l| s.get(l).copied().unwrap_or(0.0))
                .collect()
        })
    }
}

/// True bytes of one token's K (or V) in a window at `bits`: f16 values, or PM-KVQ's packed groups of a head.
fn window_token_bytes(geom: KvGeometry, bits: Bits) -> usize {
    match bits {
        Bits::B16 => geom.kv_dim() * 2,
        b => token_bytes(b, geom.head_dim, geom.kv_dim(), OffsetMode::Stored),
    }
}

/// True bytes of an fp16 cache of `tokens` tokens (the yardstick budgets such as ⅕ are fractions of): every
/// layer's K and V at f16, where `win` slides only what its local layers hold.
pub fn fp16_bytes(geom: KvGeometry, win: Option<&Windowing>, tokens: usize) -> usize {
    let tb = 2 * geom.kv_dim() * 2;
    match win {
        None => geom.layers * tokens * tb,
        Some(w) => w.globals().len() * tokens * tb + w.local_bytes(geom, tokens),
    }
}

/// The smallest budget PM-KVQ can hold `tokens` tokens in: every global body at the floor width (every layer's
/// when nothing slides), plus the windows.
pub fn pmkvq_floor(geom: KvGeometry, win: Option<&Windowing>, tokens: usize) -> usize {
    pmkvq_floor_with(geom, win, tokens, &super::PmkvqConfig::pmkvq())
}

/// [`pmkvq_floor`] for the progressive cache configured as `cfg` (an elastic window: the sink at 16 bits and
/// every other token at the floor).
pub fn pmkvq_floor_with(geom: KvGeometry, win: Option<&Windowing>, tokens: usize, cfg: &super::PmkvqConfig) -> usize {
    match win {
        None => super::PmkvqStore::floor_bytes(geom, cfg, tokens),
        Some(w) => {
            let globals = KvGeometry {
                layers: w.globals().len(),
                ..geom
            };
            super::PmkvqStore::floor_bytes(globals, cfg, tokens) + w.local_bytes_at(geom, tokens, cfg.floor_bits)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Global(usize),
    Local(usize),
}

/// A store for a model with sliding-window layers: f16 windows for the local layers, `inner` (of any method,
/// built over the global layers only) for the rest.
pub struct Windowed<S: KvStore = Box<dyn KvStore>> {
    inner: S,
    /// The inner store holds the global layers only (its layer `i` is global layer `i`), rather than every
    /// layer with the local ones left empty (unbudgeted measurement stores, which index layers as the model).
    compact: bool,
    geom: KvGeometry,
    win: Windowing,
    slots: Vec<Slot>,
    rings: Vec<Ring>,
    max_tokens: usize,
    /// The windows' width now, and the lowest they may go (the method's floor; 16 for fixed-width methods).
    bits: Bits,
    floor: Bits,
    /// Window lowerings (each window side one level).
    lowered: u64,
    /// The last total budget and shares (what a step that needs more room lowers the windows against).
    total: Option<(usize, Option<Vec<f64>>)>,
}

impl<S: KvStore> Windowed<S> {
    /// `inner` holds the global layers of `geom`: either only those (its geometry: `geom` with
    /// `win.globals().len()` layers; what budgeted stores are built as) or all of `geom`'s layers, the local
    /// ones left unused.
    pub fn new(inner: S, geom: KvGeometry, win: Windowing, max_tokens: usize) -> Result<Self, KvError> {
        Self::with_widths(inner, geom, win, max_tokens, Bits::B16, Bits::B16)
    }

    /// [`new`](Self::new) with windows stored at `start` bits (16: f16 values) that may be lowered down to
    /// `floor` when a budget needs it.
    pub fn with_widths(
        inner: S,
        geom: KvGeometry,
        win: Windowing,
        max_tokens: usize,
        start: Bits,
        floor: Bits,
    ) -> Result<Self, KvError> {
        let globals = win.globals().len();
        let inner_layers = inner.geometry().layers;
        let compact = inner_layers == globals && globals != geom.layers;
        if win.local.len() != geom.layers || win.window == 0 || !(compact || inner_layers == geom.layers) {
            return Err(KvError::BadLayer {
                layer: inner_layers,
                layers: globals,
            });
        }
        let (mut g, mut l) = (0, 0);
        let slots = win
            .local
            .iter()
            .enumerate()
            .map(|(li, &local)| {
                if local {
                    l += 1;
                    Slot::Local(l - 1)
                } else {
                    g += 1;
                    Slot::Global(if compact { g - 1 } else { li })
                }
            })
            .collect();
        Ok(Windowed {
            inner,
            compact,
            geom,
            rings: (0..l).map(|_| Ring::at(start.max(floor), geom)).collect(),
            win,
            slots,
            max_tokens,
            bits: start.max(floor),
            floor,
            lowered: 0,
            total: None,
        })
    }

    /// The windows' width now.
    pub fn window_bits(&self) -> Bits {
        self.bits
    }

    /// What the windows are set aside at `bits`.
    fn reserve_at(&self, bits: Bits) -> usize {
        self.win.local_bytes_at(self.geom, self.max_tokens, bits)
    }

    /// The highest width, at most the current one and at least the floor, at which the windows leave the global
    /// layers (needing `inner_floor`) room in `total`.
    fn width_for(&self, total: usize, inner_floor: usize) -> Result<Bits, KvError> {
        let mut bits = self.bits;
        while inner_floor + self.reserve_at(bits) > total {
            match bits.halved() {
                Some(b) if b >= self.floor => bits = b,
                _ => {
                    return Err(KvError::OutOfBudget {
                        layer: 0,
                        need: inner_floor + self.reserve_at(self.floor),
                        budget: total,
                        floor_bits: self.floor.count(),
                    })
                }
            }
        }
        Ok(bits)
    }

    /// Lower every window to `bits` (never raises).
    fn lower_windows(&mut self, bits: Bits) {
        while self.bits > bits {
            let Some(next) = self.bits.halved() else { break };
            for r in &mut self.rings {
                r.k.lower(next, self.geom);
                r.v.lower(next, self.geom);
            }
            self.lowered += 2 * self.rings.len() as u64;
            self.bits = next;
        }
    }

    fn slot(&self, layer: usize) -> Result<Slot, KvError> {
        self.slots.get(layer).copied().ok_or(KvError::BadLayer {
            layer,
            layers: self.geom.layers,
        })
    }

    fn local_true_bytes(&self) -> usize {
        self.rings.iter().map(|r| r.k.bytes() + r.v.bytes()).sum()
    }

    /// Store `n` tokens in local ring `r`; a big step keeps only what later queries read.
    fn push_local(&mut self, r: usize, k: &[f32], v: &[f32], n: usize) {
        let (kv_dim, window) = (self.geom.kv_dim(), self.win.window);
        let cap = self.win.held_cap() * kv_dim;
        let ring = &mut self.rings[r];
        let len = ring.len;
        let skip = if n > SLACK {
            // a big step: keep only what the next query reads
            let keep_from = (len + n).saturating_sub(window - 1);
            ring.drop_before(keep_from, kv_dim);
            ring.first = ring.first.max(keep_from);
            keep_from.saturating_sub(len)
        } else {
            0
        };
        ring.k.push(&k[skip * kv_dim..], kv_dim, cap);
        ring.v.push(&v[skip * kv_dim..], kv_dim, cap);
        ring.len = len + n;
    }

    /// Before a step: drop stale tokens once there are SLACK of them (never one this step reads).
    fn evict(&mut self, r: usize) {
        let (kv_dim, window) = (self.geom.kv_dim(), self.win.window);
        let ring = &mut self.rings[r];
        let need_from = (ring.len + 1).saturating_sub(window);
        if need_from >= ring.first + SLACK {
            ring.drop_before(need_from, kv_dim);
        }
    }

    /// Attention of `n` new tokens of local ring `r` over their windows: the ring's tokens (dequantized where
    /// the window was lowered) and the step's own, unquantized, all rounded to f16 as llama.cpp's f16 cache keeps
    /// them ([`super::F16KvStore`]'s semantics), gathered into one buffer (a lowered window, or a big step).
    fn attend_local(&self, r: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
        let kv_dim = self.geom.kv_dim();
        let ring = &self.rings[r];
        // the old window tokens any of the n queries reads, then the step's own tokens
        let from = (ring.len + 1).saturating_sub(self.win.window).max(ring.first);
        let old = (ring.len - from) * kv_dim;
        let mut ks: Vec<f16> = Vec::with_capacity(old + n * kv_dim);
        let mut vs: Vec<f16> = Vec::with_capacity(old + n * kv_dim);
        ring.k.extend_f16(from - ring.first, kv_dim, &mut ks);
        ring.v.extend_f16(from - ring.first, kv_dim, &mut vs);
        ks.extend(k.iter().map(|&x| f16::from_f32(x)));
        vs.extend(v.iter().map(|&x| f16::from_f32(x)));
        self.attend_rows(&ks, &vs, from, ring.len, q, n, out);
    }

    /// Attention of `n` query tokens at positions `pos0..pos0 + n` over f16 K/V rows whose first row is position
    /// `base`; each query sees its window (`pos − window + 1 ..= pos`, from `base` on). Q rounded to f16.
    #[allow(clippy::too_many_arguments)]
    fn attend_rows(&self, ks: &[f16], vs: &[f16], base: usize, pos0: usize, q: &[f32], n: usize, out: &mut [f32]) {
        let g = self.geom;
        let (d, kv_dim, qh, window) = (g.head_dim, g.kv_dim(), g.q_heads, self.win.window);
        let qr: Vec<f32> = q[..n * qh * d].iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let heads = Heads {
            q_heads: qh,
            kv_heads: g.kv_heads,
            d,
        };
        for i in 0..n {
            let pos = pos0 + i;
            let lo = (pos + 1).saturating_sub(window).max(base) - base;
            let hi = pos + 1 - base;
            let kr = F16Rows {
                data: &ks[lo * kv_dim..hi * kv_dim],
                kv_heads: g.kv_heads,
                d,
            };
            let vr = F16Rows {
                data: &vs[lo * kv_dim..hi * kv_dim],
                ..kr
            };
            attend_layer(
                GroupOps::detected(),
                &[&kr],
                &[&vr],
                heads,
                &qr[i * qh * d..(i + 1) * qh * d],
                1,
                |_| (hi - lo, None),
                &mut out[i * qh * d..(i + 1) * qh * d],
            );
        }
    }

    fn check_capacity(&self, layer: usize, n: usize) -> Result<(), KvError> {
        let stored = self.len(layer);
        if stored + n > self.max_tokens {
            return Err(KvError::CapacityExceeded {
                layer,
                stored: stored + n,
                limit: self.max_tokens,
            });
        }
        Ok(())
    }
}

impl<S: KvStore> KvStore for Windowed<S> {
    fn windowing(&self) -> Option<&Windowing> {
        Some(&self.win)
    }

    fn geometry(&self) -> KvGeometry {
        self.geom
    }

    fn len(&self, layer: usize) -> usize {
        match self.slot(layer) {
            Ok(Slot::Global(g)) => self.inner.len(g),
            Ok(Slot::Local(r)) => self.rings[r].len,
            Err(_) => 0,
        }
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
        check_inputs(&self.geom, layer, q, k, v, n, out)?;
        match self.slot(layer)? {
            Slot::Global(g) => self.inner.attend_and_store(g, q, k, v, n, out),
            Slot::Local(r) => {
                self.check_capacity(layer, n)?;
                self.evict(r);
                let len = self.rings[r].len;
                if n <= SLACK && matches!(self.rings[r].k, Side::F16(_)) {
                    // f16 window, small step: store first (exactly what the copy below would hold), then read
                    // the ring in place — no per-step copy of the window on the decode path
                    self.push_local(r, k, v, n);
                    let ring = &self.rings[r];
                    if let (Side::F16(ks), Side::F16(vs)) = (&ring.k, &ring.v) {
                        self.attend_rows(ks, vs, ring.first, len, q, n, out);
                    }
                } else {
                    self.attend_local(r, q, k, v, n, out);
                    self.push_local(r, k, v, n);
                }
                Ok(())
            }
        }
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        check_append(&self.geom, layer, k, v, n)?;
        match self.slot(layer)? {
            Slot::Global(g) => self.inner.append(g, k, v, n),
            Slot::Local(r) => {
                self.check_capacity(layer, n)?;
                self.evict(r);
                self.push_local(r, k, v, n);
                Ok(())
            }
        }
    }

    fn clear(&mut self) {
        self.inner.clear();
        let (bits, geom) = (self.bits, self.geom);
        for r in &mut self.rings {
            *r = Ring::at(bits, geom);
        }
    }

    fn truncate(&mut self, tokens: usize) {
        self.inner.truncate(tokens);
        let (kv_dim, window, bits, geom) = (self.geom.kv_dim(), self.win.window, self.bits, self.geom);
        for r in &mut self.rings {
            if tokens >= r.len {
                continue;
            }
            if tokens == 0 {
                *r = Ring::at(bits, geom);
            } else if r.first <= (tokens + 1).saturating_sub(window) {
                // exact: every token the next query (at position `tokens`) reads is still held
                r.k.truncate(tokens - r.first, kv_dim);
                r.v.truncate(tokens - r.first, kv_dim);
                r.len = tokens;
            }
            // else the window was evicted past what `tokens` needs: the length stays, which says so
        }
    }

    fn true_bytes(&self) -> usize {
        self.inner.true_bytes() + self.local_true_bytes()
    }

    fn payload_bytes(&self) -> usize {
        self.inner.payload_bytes() + self.local_true_bytes()
    }

    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        self.check_capacity(0, n)?;
        loop {
            match self.inner.reserve(n) {
                // the global layers at their floor need more: the windows give it up, a level at a time
                Err(KvError::OutOfBudget { .. })
                    if self.total.is_some() && self.bits.halved().is_some_and(|b| b >= self.floor) =>
                {
                    let (total, shares) = self.total.clone().unwrap_or_default();
                    let next = self.bits.halved().unwrap_or(self.floor);
                    self.lower_windows(next);
                    self.inner
                        .set_total_budget(total.saturating_sub(self.reserve_at(next)), shares.as_deref(), n)?;
                }
                done => return done,
            }
        }
    }

    fn layer_bits(&self) -> Vec<u32> {
        let inner = self.inner.layer_bits();
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Global(g) => inner.get(*g).copied().unwrap_or(16),
                Slot::Local(_) => self.bits.count(),
            })
            .collect()
    }

    fn layer_kv_bits(&self) -> Vec<[u32; 2]> {
        let inner = self.inner.layer_kv_bits();
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Global(g) => inner.get(*g).copied().unwrap_or([16, 16]),
                Slot::Local(_) => [self.bits.count(); 2],
            })
            .collect()
    }

    fn set_layer_budgets(&mut self, budgets: &[usize]) -> Result<(), KvError> {
        if !self.compact {
            return self.inner.set_layer_budgets(budgets);
        }
        let globals: Vec<usize> = self
            .win
            .globals()
            .iter()
            .map(|&l| budgets.get(l).copied().unwrap_or(0))
            .collect();
        self.inner.set_layer_budgets(&globals)
    }

    fn method(&self) -> String {
        self.inner.method()
    }

    fn floor_bytes(&self, ahead: usize) -> usize {
        self.inner.floor_bytes(ahead) + self.reserve_at(self.floor)
    }

    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        // The windows' width is chosen for the whole sequence: lowering the global layers' bodies cannot be
        // undone, so windows that would have to give way later anyway give way now, before the global layers are
        // squeezed into what f16 windows leave them. Only what the sequence needs now can refuse the budget.
        let rest = self.max_tokens.saturating_sub(self.len(0)).max(ahead);
        let bits = self
            .width_for(total, self.inner.floor_bytes(rest))
            .or_else(|_| self.width_for(total, self.inner.floor_bytes(ahead)))?;
        self.lower_windows(bits);
        let shares = self.inner_shares(shares);
        self.total = Some((total, shares.clone()));
        self.inner
            .set_total_budget(total - self.reserve_at(bits), shares.as_deref(), ahead)
    }

    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let mut inner = Vec::new();
        self.inner.spill_to(&mut inner)?;
        let mut w = spill::Writer::new(out, "windowed");
        w.u64(self.win.window as u64);
        w.u64(self.rings.len() as u64);
        w.u64(self.bits.count() as u64);
        for r in &self.rings {
            w.u64(r.first as u64);
            w.u64(r.len as u64);
            for side in [&r.k, &r.v] {
                match side {
                    Side::F16(v) => w.f16s(v),
                    Side::Packed(p) => w.rows(p),
                }
            }
        }
        w.bytes(&inner);
        w.finish()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let inner = self.restore_rings(data)?;
        self.inner.restore(inner)
    }

    fn restore_within(
        &mut self,
        data: &[u8],
        total: usize,
        shares: Option<&[f64]>,
        ahead: usize,
    ) -> Result<(), KvError> {
        let inner = self.restore_rings(data)?;
        let shares = self.inner_shares(shares);
        // the windows as spilled first; lowered a level at a time while the global layers do not fit beside them
        loop {
            let room = total.saturating_sub(self.reserve_at(self.bits));
            match self.inner.restore_within(inner, room, shares.as_deref(), ahead) {
                Err(KvError::OutOfBudget { .. }) if self.bits.halved().is_some_and(|b| b >= self.floor) => {
                    let next = self.bits.halved().unwrap_or(self.floor);
                    self.lower_windows(next);
                }
                done => return done,
            }
        }
    }

    fn requantizations(&self) -> u64 {
        self.inner.requantizations() + self.lowered
    }
}

impl<S: KvStore> Windowed<S> {
    /// The shares for the inner store's layers: the global layers' own (compact), or every layer's with the
    /// local ones at 0 (their inner layers never fill).
    fn inner_shares(&self, shares: Option<&[f64]>) -> Option<Vec<f64>> {
        if self.compact {
            return self.win.global_shares(shares);
        }
        let s = shares
            .map(<[f64]>::to_vec)
            .unwrap_or_else(|| vec![1.0; self.geom.layers]);
        Some(
            s.iter()
                .zip(&self.win.local)
                .map(|(&x, &l)| if l { 0.0 } else { x })
                .collect(),
        )
    }

    /// The inner store itself (a measurement store's statistics).
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Read the local layers of a spill (checked whole before anything changes); returns the inner store's part.
    fn restore_rings<'a>(&mut self, data: &'a [u8]) -> Result<&'a [u8], KvError> {
        let bad = KvError::Corrupt;
        let mut r = spill::Reader::new(data, "windowed")?;
        let window = r.u64()? as usize;
        let count = r.u64()? as usize;
        let bits = u32::try_from(r.u64()?)
            .ok()
            .and_then(Bits::from_count)
            .ok_or_else(|| bad("bad window width".into()))?;
        if window != self.win.window || count != self.rings.len() {
            return Err(bad(format!(
                "spill of {count} window layers of {window} tokens, this store has {} of {}",
                self.rings.len(),
                self.win.window
            )));
        }
        let kv_dim = self.geom.kv_dim();
        let template = PackedRows::new(
            bits.min(Bits::B8),
            self.geom.head_dim,
            self.geom.kv_heads,
            self.geom.head_dim,
            OffsetMode::Stored,
        );
        let mut rings = Vec::with_capacity(count);
        for _ in 0..count {
            let (first, len) = (r.u64()? as usize, r.u64()? as usize);
            let held = len
                .checked_sub(first)
                .ok_or_else(|| bad(format!("window starts at {first} past its end {len}")))?;
            let mut side = || -> Result<(Side, usize), KvError> {
                Ok(if bits == Bits::B16 {
                    let v = r.f16s()?;
                    let n = v.len();
                    (Side::F16(v), n)
                } else {
                    let p = r.rows(&template)?;
                    if p.bits != bits {
                        return Err(bad("a window side at another width".into()));
                    }
                    let n = p.len() * kv_dim;
                    (Side::Packed(p), n)
                })
            };
            let ((k, kn), (v, vn)) = (side()?, side()?);
            if kn != held * kv_dim || vn != kn || held > self.win.held_cap() || len > self.max_tokens {
                return Err(bad(format!("window layer of {held} tokens holds {kn} values")));
            }
            rings.push(Ring { k, v, first, len });
        }
        let inner = r.bytes()?;
        r.finish()?;
        if bits > self.bits {
            return Err(bad(format!(
                "windows spilled at {} bits, this store's are at {}",
                bits.count(),
                self.bits.count()
            )));
        }
        self.rings = rings;
        self.bits = bits;
        Ok(inner)
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
