//! Sliding-window ("local") layers (Gemma 3: five local layers to one global, window 512): a local layer's
//! token at position p sees positions `p − window + 1 ..= p` only, so its cache never needs more than the last
//! `window − 1` tokens before a step. [`Windowed`] keeps those at f16 (as llama.cpp's default cache does) in a
//! small buffer per local layer whose size is bounded and independent of the trace length, and hands the global
//! layers to an inner store of any method, built over those layers only: PM-KVQ's budgets, floors, shares and
//! planned widths then cover exactly the layers whose cost grows with the trace, and the window's bounded cost is
//! set aside first.
//!
//! Eviction is lazy (once [`SLACK`] tokens have gone stale), so a decode step copies nothing; and a step never
//! evicts a token the step itself reads, so the last step can always be taken back ([`KvStore::truncate`]). A
//! step of more than [`SLACK`] tokens (a prefill chunk) reads the old window and its own tokens, then keeps only
//! the last `window − 1`: such a step cannot be taken back, which `truncate` reports by leaving the layer's
//! length as it was (the engine then ends that sequence rather than run it on a state no forward pass made).

use super::attention::group::{attend_layer, F16Rows, GroupOps, Heads};
use super::{check_append, check_inputs, spill, KvError, KvGeometry, KvStore};
use half::f16;

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
    /// True bytes every local layer together holds at most over a sequence of at most `max_tokens` tokens: the
    /// windows' share of any budget, set aside before the global layers get theirs — small, and constant
    /// whatever the trace length.
    pub fn local_bytes(&self, geom: KvGeometry, max_tokens: usize) -> usize {
        self.locals() * max_tokens.min(self.held_cap()) * 2 * geom.kv_dim() * 2
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
    let cfg = super::PmkvqConfig::pmkvq();
    match win {
        None => super::PmkvqStore::floor_bytes(geom, &cfg, tokens),
        Some(w) => {
            let globals = KvGeometry {
                layers: w.globals().len(),
                ..geom
            };
            super::PmkvqStore::floor_bytes(globals, &cfg, tokens) + w.local_bytes(geom, tokens)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Global(usize),
    Local(usize),
}

/// One local layer: positions `first..len` at f16, token-major (`[token][kv_head][d]`).
#[derive(Default)]
struct Ring {
    k: Vec<f16>,
    v: Vec<f16>,
    first: usize,
    len: usize,
}

impl Ring {
    /// Drop positions before `from` (which must be held or past the end).
    fn drop_before(&mut self, from: usize, kv_dim: usize) {
        let from = from.min(self.len);
        if from > self.first {
            let cut = (from - self.first) * kv_dim;
            self.k.drain(..cut);
            self.v.drain(..cut);
            self.first = from;
        }
    }
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
}

impl<S: KvStore> Windowed<S> {
    /// `inner` holds the global layers of `geom`: either only those (its geometry: `geom` with
    /// `win.globals().len()` layers; what budgeted stores are built as) or all of `geom`'s layers, the local
    /// ones left unused.
    pub fn new(inner: S, geom: KvGeometry, win: Windowing, max_tokens: usize) -> Result<Self, KvError> {
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
            rings: (0..l).map(|_| Ring::default()).collect(),
            win,
            slots,
            max_tokens,
        })
    }

    fn slot(&self, layer: usize) -> Result<Slot, KvError> {
        self.slots.get(layer).copied().ok_or(KvError::BadLayer {
            layer,
            layers: self.geom.layers,
        })
    }

    fn local_true_bytes(&self) -> usize {
        self.rings.iter().map(|r| (r.k.len() + r.v.len()) * 2).sum()
    }

    /// What the windows are set aside in every budget.
    fn local_reserve(&self) -> usize {
        self.win.local_bytes(self.geom, self.max_tokens)
    }

    /// Store `n` tokens in local ring `r`; a big step keeps only what later queries read.
    fn push_local(&mut self, r: usize, k: &[f32], v: &[f32], n: usize) {
        let (kv_dim, window) = (self.geom.kv_dim(), self.win.window);
        let ring = &mut self.rings[r];
        let len = ring.len;
        if n > SLACK {
            // a big step: keep only what the next query reads
            let keep_from = (len + n).saturating_sub(window - 1);
            ring.drop_before(keep_from, kv_dim);
            let skip = keep_from.saturating_sub(len);
            ring.k.extend(k[skip * kv_dim..].iter().map(|&x| f16::from_f32(x)));
            ring.v.extend(v[skip * kv_dim..].iter().map(|&x| f16::from_f32(x)));
            ring.first = ring.first.max(keep_from);
        } else {
            // never grow past the cap by doubling: the buffer is the window's whole cost
            let cap = self.win.held_cap() * kv_dim;
            if ring.k.len() + k.len() > ring.k.capacity() {
                let want = (ring.k.len() + k.len())
                    .max(ring.k.capacity() * 2)
                    .min(cap.max(ring.k.len() + k.len()));
                ring.k.reserve_exact(want - ring.k.len());
                ring.v.reserve_exact(want - ring.v.len());
            }
            ring.k.extend(k.iter().map(|&x| f16::from_f32(x)));
            ring.v.extend(v.iter().map(|&x| f16::from_f32(x)));
        }
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

    /// Attention of `n` new tokens of local ring `r` over their windows: the ring's f16 tokens and the step's
    /// own, rounded to f16 as the store keeps them (llama.cpp's f16 cache semantics, as [`super::F16KvStore`]).
    #[allow(clippy::too_many_arguments)]
    fn attend_local(&self, r: usize, q: &[f32], k: &[f32], v: &[f32], n: usize, out: &mut [f32]) {
        let g = self.geom;
        let (d, kv_dim, qh) = (g.head_dim, g.kv_dim(), g.q_heads);
        let ring = &self.rings[r];
        let window = self.win.window;
        // the old window tokens any of the n queries reads, then the step's own tokens, in one f16 buffer
        let from = (ring.len + 1).saturating_sub(window).max(ring.first);
        let old = (from - ring.first) * kv_dim..ring.k.len();
        let mut ks: Vec<f16> = Vec::with_capacity(old.len() + n * kv_dim);
        let mut vs: Vec<f16> = Vec::with_capacity(old.len() + n * kv_dim);
        ks.extend_from_slice(&ring.k[old.clone()]);
        vs.extend_from_slice(&ring.v[old]);
        ks.extend(k.iter().map(|&x| f16::from_f32(x)));
        vs.extend(v.iter().map(|&x| f16::from_f32(x)));
        let qr: Vec<f32> = q[..n * qh * d].iter().map(|&x| f16::from_f32(x).to_f32()).collect();
        let heads = Heads {
            q_heads: qh,
            kv_heads: g.kv_heads,
            d,
        };
        for i in 0..n {
            // token i is at position ring.len + i and sees max(from, pos − window + 1) ..= pos
            let pos = ring.len + i;
            let lo = (pos + 1).saturating_sub(window).max(from) - from;
            let hi = pos + 1 - from;
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
                self.attend_local(r, q, k, v, n, out);
                self.push_local(r, k, v, n);
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
        for r in &mut self.rings {
            *r = Ring::default();
        }
    }

    fn truncate(&mut self, tokens: usize) {
        self.inner.truncate(tokens);
        let (kv_dim, window) = (self.geom.kv_dim(), self.win.window);
        for r in &mut self.rings {
            if tokens >= r.len {
                continue;
            }
            if tokens == 0 {
                *r = Ring::default();
            } else if r.first <= (tokens + 1).saturating_sub(window) {
                // exact: every token the next query (at position `tokens`) reads is still held
                let keep = (tokens - r.first) * kv_dim;
                r.k.truncate(keep);
                r.v.truncate(keep);
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
        self.inner.reserve(n)
    }

    fn layer_bits(&self) -> Vec<u32> {
        let inner = self.inner.layer_bits();
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Global(g) => inner.get(*g).copied().unwrap_or(16),
                Slot::Local(_) => 16,
            })
            .collect()
    }

    fn layer_kv_bits(&self) -> Vec<[u32; 2]> {
        let inner = self.inner.layer_kv_bits();
        self.slots
            .iter()
            .map(|s| match s {
                Slot::Global(g) => inner.get(*g).copied().unwrap_or([16, 16]),
                Slot::Local(_) => [16, 16],
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
        self.inner.floor_bytes(ahead) + self.local_reserve()
    }

    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        let inner_total = total.saturating_sub(self.local_reserve());
        let shares = self.inner_shares(shares);
        self.inner
            .set_total_budget(inner_total, shares.as_deref(), ahead)
            .map_err(|e| match e {
                KvError::OutOfBudget { layer, floor_bits, .. } => KvError::OutOfBudget {
                    layer,
                    need: self.floor_bytes(ahead),
                    budget: total,
                    floor_bits,
                },
                e => e,
            })
    }

    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let mut inner = Vec::new();
        self.inner.spill_to(&mut inner)?;
        let mut w = spill::Writer::new(out, "windowed");
        w.u64(self.win.window as u64);
        w.u64(self.rings.len() as u64);
        for r in &self.rings {
            w.u64(r.first as u64);
            w.u64(r.len as u64);
            w.f16s(&r.k);
            w.f16s(&r.v);
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
        let inner_total = total.saturating_sub(self.local_reserve());
        let shares = self.inner_shares(shares);
        self.inner.restore_within(inner, inner_total, shares.as_deref(), ahead)
    }

    fn requantizations(&self) -> u64 {
        self.inner.requantizations()
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
        if window != self.win.window || count != self.rings.len() {
            return Err(bad(format!(
                "spill of {count} window layers of {window} tokens, this store has {} of {}",
                self.rings.len(),
                self.win.window
            )));
        }
        let kv_dim = self.geom.kv_dim();
        let mut rings = Vec::with_capacity(count);
        for _ in 0..count {
            let (first, len) = (r.u64()? as usize, r.u64()? as usize);
            let (k, v) = (r.f16s()?, r.f16s()?);
            let held = len
                .checked_sub(first)
                .ok_or_else(|| bad(format!("window starts at {first} past its end {len}")))?;
            if k.len() != held * kv_dim || v.len() != k.len() || held > self.win.held_cap() || len > self.max_tokens {
                return Err(bad(format!("window layer of {held} tokens holds {} values", k.len())));
            }
            rings.push(Ring { k, v, first, len });
        }
        let inner = r.bytes()?;
        r.finish()?;
        self.rings = rings;
        Ok(inner)
    }
}

#[cfg(test)]
#[path = "window_tests.rs"]
mod tests;
