//! The PM-KVQ progressive cache (spec §3) and the fixed-width baselines that share its storage.
//!
//! Per layer, separately for K and V: a 16-bit **sink** (first `sink` tokens), a **body** at the layer's current
//! width, and a chunked 16-bit **window** of 0..W−1 recent tokens. Order, also for attention: sink | body |
//! window. On every store, the general form of §3.4 runs (multi-token updates take `n_out − w` new tokens into
//! the flushed chunk, §9 item 6); the flushed chunk is lowered to the body's width by repeated ERS. While a
//! layer's true bytes exceed its budget, its whole body drops one level (a loop, §9 item 9).
//!
//! Invariant: true bytes ≤ budget in every layer after every call that returns Ok. `reserve` refuses a step
//! that could not fit even at the floor width *before* any layer changes, so a refusal loses nothing.

use super::attention::group::{attend_layer, GroupOps, Heads};
use super::attention::Fresh;
use super::quant::rows::group_fits;
use super::quant::{Bits, OffsetMode, PackedRows};
use super::{check_append, check_inputs, KvError, KvGeometry, KvStore};
use rayon::prelude::*;

mod config;
mod enforce;
mod plan;
mod recent;
mod shared;
use config::Seg;
pub use config::{PmkvqConfig, Quantizer};
use enforce::{charged_bytes, enforce_layer, Enforced};
pub use plan::{knapsack, level, Sensitivity, LEVELS, UNIFORM_ROW};
use recent::flushed;
pub use shared::{read_spill, split_total_budget, write_spill, SpillLayers, SpilledLayer};

struct Side {
    sink: PackedRows,
    body: PackedRows,
    window: PackedRows,
}

impl Side {
    fn bytes(&self) -> usize {
        self.sink.true_bytes() + self.body.true_bytes() + self.window.true_bytes()
    }
    fn payload(&self) -> usize {
        self.sink.payload_bytes() + self.body.payload_bytes() + self.window.payload_bytes()
    }
    fn len(&self) -> usize {
        self.sink.len() + self.body.len() + self.window.len()
    }
    fn segments(&self) -> [&PackedRows; 3] {
        [&self.sink, &self.body, &self.window]
    }
}

struct Layer {
    k: Side,
    v: Side,
    budget: usize,
}

/// A layer read back from a spill, under the budget it was spilled with.
impl From<SpilledLayer> for Layer {
    fn from(l: SpilledLayer) -> Layer {
        let side = |[sink, body, window]: [PackedRows; 3]| Side { sink, body, window };
        let [k, v] = l.sides;
        Layer {
            k: side(k),
            v: side(v),
            budget: l.budget,
        }
    }
}

/// A layer as budgets see it: `[sink, body, window]` tokens and the body's width.
type Shape = ([usize; 3], Bits);

/// Fixed per-layer bookkeeping counted in true bytes (the segment headers themselves).
const LAYER_BOOKKEEPING: usize = std::mem::size_of::<Layer>();

pub struct PmkvqStore {
    geom: KvGeometry,
    /// The configuration with the window as the budget sizes it now ([`PmkvqConfig::window_share`]).
    cfg: PmkvqConfig,
    /// The configuration as given.
    base: PmkvqConfig,
    layers: Vec<Layer>,
    max_tokens: usize,
    /// Layer bodies lowered one level, since creation.
    requants: u64,
    /// The whole cache's budget, when widths are planned from the calibrated sensitivity ([`plan`]).
    total: Option<usize>,
    /// Per layer, the width and budget the step's plan lowers it to once its attention has read it
    /// ([`plan`]: a prompt chunk reads the cache as it was before the step where the total allows).
    deferred: Vec<Option<(usize, [Bits; 2])>>,
}

impl PmkvqStore {
    /// `budgets`: per-layer true-byte budgets (`usize::MAX` = unlimited).
    pub fn new(geom: KvGeometry, mut cfg: PmkvqConfig, budgets: &[usize], max_tokens: usize) -> Result<Self, KvError> {
        if budgets.len() != geom.layers {
            return Err(KvError::BadBudgets {
                what: "layer budgets",
                expected: geom.layers,
                got: budgets.len(),
            });
        }
        cfg.group = cfg.group_for(geom);
        if let Some(s) = &cfg.sensitivity {
            cfg.sensitivity = Some(s.for_layers(geom.layers)?);
        }
        if !group_fits(cfg.group, geom.head_dim) {
            return Err(KvError::BadGroup {
                method: cfg.name.clone(),
                group: cfg.group,
                head_dim: geom.head_dim,
            });
        }
        let offsets = cfg.body_offsets();
        let (g, h, d) = (cfg.group, geom.kv_heads, geom.head_dim);
        let base = cfg.clone();
        // the window as the budgets size it
        (cfg.window, cfg.window_bits) =
            base.window_for(geom, budgets.iter().fold(0usize, |a, &b| a.saturating_add(b)), 0);
        let side = || Side {
            sink: PackedRows::new(Bits::B16, g, h, d, OffsetMode::Stored),
            body: PackedRows::new(cfg.body_start_bits(), g, h, d, offsets),
            window: PackedRows::new(cfg.window_bits, g, h, d, OffsetMode::Stored),
        };
        let layers = budgets
            .iter()
            .map(|&budget| Layer {
                k: side(),
                v: side(),
                budget,
            })
            .collect();
        Ok(PmkvqStore {
            geom,
            cfg,
            layers,
            max_tokens,
            base,
            requants: 0,
            total: None,
            deferred: Vec::new(),
        })
    }

    /// True bytes one token costs in every layer (K and V) with its body at `bits`.
    pub fn token_bytes(geom: KvGeometry, cfg: &PmkvqConfig, bits: Bits) -> usize {
        2 * cfg.token_bytes_in(geom, Seg::Body(bits)) * geom.layers
    }

    /// The largest true bytes a sequence of up to `tokens` tokens needs with every body at the floor width: the
    /// smallest total budget under which PM-KVQ can hold it (window fill varies, so the maximum over lengths; a
    /// capped window's floor is at most this).
    pub fn floor_bytes(geom: KvGeometry, cfg: &PmkvqConfig, tokens: usize) -> usize {
        let (tb16, tbw, tbf) = (
            cfg.token_bytes_in(geom, Seg::Sink),
            cfg.token_bytes_in(geom, Seg::Window),
            cfg.token_bytes_in(geom, Seg::Body(cfg.floor_bits)),
        );
        let per_layer = |t: usize| {
            let sink = t.min(cfg.sink);
            let rest = t - sink;
            // an elastic window yields every token at the floor
            let window = if cfg.window_yields() { 0 } else { cfg.window };
            let (body, win) = flushed(0, rest, window);
            2 * (sink * tb16 + win * tbw + body * tbf) + LAYER_BOOKKEEPING
        };
        (0..=tokens).map(per_layer).max().unwrap_or(0) * geom.layers
    }

    /// Split a total budget over layers by calibrated shares (spec §11). The 16-bit sink and a full window cost
    /// every layer the same whatever its width, so each layer first gets that fixed part and the rest is split
    /// by share; splitting the whole total by share would starve the narrow layers' windows on long sequences.
    pub fn budgets_from_shares(geom: KvGeometry, cfg: &PmkvqConfig, total: usize, shares: &[f64]) -> Vec<usize> {
        // the window as this total sizes it
        let (window, window_bits) = cfg.window_for(geom, total, 0);
        let sized = PmkvqConfig {
            window_bits,
            ..cfg.clone()
        };
        let (tb16, tbw) = (
            cfg.token_bytes_in(geom, Seg::Sink),
            sized.token_bytes_in(geom, Seg::Window),
        );
        let fixed = 2 * (cfg.sink * tb16 + window.saturating_sub(1) * tbw) + LAYER_BOOKKEEPING;
        let layers = shares.len().max(1);
        let rest = total.saturating_sub(fixed * layers);
        if rest == 0 {
            return vec![total / layers; shares.len()];
        }
        let sum: f64 = shares.iter().sum::<f64>().max(f64::MIN_POSITIVE);
        shares
            .iter()
            .map(|s| fixed + (rest as f64 * s / sum).floor() as usize)
            .collect()
    }

    pub fn config(&self) -> &PmkvqConfig {
        &self.base
    }

    pub fn layer_true_bytes(&self, layer: usize) -> usize {
        let l = &self.layers[layer];
        l.k.bytes() + l.v.bytes() + LAYER_BOOKKEEPING
    }

    pub fn layer_budgets(&self) -> Vec<usize> {
        self.layers.iter().map(|l| l.budget).collect()
    }

    /// The least true bytes layer `li` can hold what it has and `n` more tokens in: its bodies at the floor
    /// width (and, with an elastic window, no window).
    fn floor_need(&self, li: usize, n: usize) -> usize {
        self.floor_projected(self.shape(li).0, n, self.floor_bits(li))
    }

    /// [`projected`](Self::projected) at the floor width `bits`: with an elastic window every window token may
    /// go to the body, so the least a layer needs is its sink at 16 bits and every other token at the floor
    /// (after the step: storing only adds tokens).
    fn floor_projected(&self, lens: [usize; 3], n: usize, bits: Bits) -> usize {
        if !self.cfg.window_yields() {
            return self.projected(lens, n, bits);
        }
        let total = lens.iter().sum::<usize>() + n;
        let sink = total.min(self.cfg.sink);
        self.bytes_after([sink, total - sink, 0], 0, bits)
    }

    /// Layer `li`'s [`Shape`].
    fn shape(&self, li: usize) -> Shape {
        let s = &self.layers[li].k;
        ([s.sink.len(), s.body.len(), s.window.len()], s.body.bits)
    }

    /// Per-layer budgets for `total` true bytes over layers of these shapes, `ahead` tokens to come
    /// ([`split_total_budget`] of their floors and current widths).
    fn split_budget(
        &self,
        shapes: &[Shape],
        total: usize,
        shares: Option<&[f64]>,
        ahead: usize,
    ) -> Result<Vec<usize>, KvError> {
        let floors = shapes
            .iter()
            .map(|&(len, bits)| self.floor_projected(len, ahead, self.floor_for(bits)))
            .collect();
        let current = shapes
            .iter()
            .map(|&(len, bits)| self.projected(len, ahead, bits))
            .collect();
        split_total_budget(floors, current, total, shares, self.cfg.floor_bits.count())
    }

    /// What a layer holding `[sink, body, window]` tokens needs with its body at `body_bits`, now and after
    /// storing `n` more: the larger of the two. (Storing can lower the true bytes: a full window flushes into the
    /// narrower body. A budget split on the bytes after the step alone would give the layer less than it holds
    /// until then, and fitting it would fail although the step fits.)
    fn projected(&self, lens: [usize; 3], n: usize, body_bits: Bits) -> usize {
        self.bytes_after(lens, 0, body_bits)
            .max(self.bytes_after(lens, n, body_bits))
    }

    /// True bytes of a layer holding `[sink, body, window]` tokens after storing `n` more with its body at
    /// `body_bits`.
    fn bytes_after(&self, lens: [usize; 3], n: usize, body_bits: Bits) -> usize {
        let bookkeeping = if self.cfg.payload_accounting {
            0
        } else {
            LAYER_BOOKKEEPING
        };
        2 * self.side_bytes_after(lens, n, body_bits) + bookkeeping
    }

    /// One side's (K's or V's) part of [`bytes_after`](Self::bytes_after).
    fn side_bytes_after(&self, [sink0, body0, win0]: [usize; 3], n: usize, body_bits: Bits) -> usize {
        let sink = (sink0 + n).min(self.cfg.sink);
        let rem = n - (sink - sink0);
        let (body, win) = flushed(body0, win0 + rem, self.cfg.window);
        let charged = |seg: Seg| self.cfg.charged_token_bytes(self.geom, seg);
        sink * charged(Seg::Sink) + win * charged(Seg::Window) + body * charged(Seg::Body(body_bits))
    }

    fn floor_bits(&self, li: usize) -> Bits {
        self.floor_for(self.layers[li].k.body.bits)
    }

    /// The lowest width a body now at `bits` may be lowered to.
    fn floor_for(&self, bits: Bits) -> Bits {
        if self.cfg.adaptive {
            self.cfg.floor_bits
        } else {
            bits
        }
    }

    /// Shrink layer `li` until it fits its budget.
    fn enforce(&mut self, li: usize) -> Result<(), KvError> {
        let r = enforce_layer(&self.cfg, self.geom, li, &mut self.layers[li]);
        self.requants = self.requants.saturating_add(r.levels);
        r.result
    }

    /// Count the levels the layers were lowered by; the first refusal, if any, is the result.
    fn tally(&mut self, results: Vec<Enforced>) -> Result<(), KvError> {
        let mut first_err = None;
        for r in results {
            self.requants = self.requants.saturating_add(r.levels);
            if let Err(e) = r.result {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl KvStore for PmkvqStore {
    fn geometry(&self) -> KvGeometry {
        self.geom
    }

    fn len(&self, layer: usize) -> usize {
        self.layers.get(layer).map_or(0, |l| l.k.len())
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
        let g = self.geom;
        check_inputs(&g, layer, q, k, v, n, out)?;
        let (d, kv_dim, qh) = (g.head_dim, g.kv_dim(), g.q_heads);
        let llama = self.cfg.llama_semantics;
        let rounded_q;
        if llama {
            self.lower_deferred(layer);
        }
        let (q, n_raw) = if llama {
            let l = &mut self.layers[layer];
            l.k.store(&self.cfg, k, kv_dim);
            l.v.store(&self.cfg, v, kv_dim);
            rounded_q = super::quant::round_through_q8_0(q);
            (&rounded_q[..], 0)
        } else {
            (q, n)
        };
        let l = &self.layers[layer];
        // with llama semantics the new tokens are already stored: token i sees the stored prefix up to itself
        let stored = l.k.len() - (n - n_raw);
        let (segs_k, segs_v) = (l.k.segments(), l.v.segments());
        let heads = Heads {
            q_heads: qh,
            kv_heads: g.kv_heads,
            d,
        };
        // llama semantics: token i sees the stored prefix up to itself; otherwise the stored tokens and then the
        // call's tokens up to itself, unquantized (spec §3.3)
        let see = |i: usize| {
            if n_raw == 0 {
                (stored + i + 1, None)
            } else {
                let fresh = Fresh {
                    k,
                    v,
                    stride: kv_dim,
                    count: i + 1,
                };
                (stored, Some(fresh))
            }
        };
        attend_layer(GroupOps::detected(), &segs_k, &segs_v, heads, q, n, see, out);
        // read: now the plan may lower this layer for the tokens it stores
        self.lower_deferred(layer);
        // store after attention (post-attention quantization, WKVQuant-style)
        if !llama {
            let (cfg, window) = (&self.cfg, self.cfg.window);
            let l = &mut self.layers[layer];
            if window > 0 && l.k.window.len() + n >= window {
                // a window chunk flushes: lowering it (and fitting it at the 2-bit floor) is the step's one
                // sizeable piece of store work, so K and V take a core each
                let (ks, vs) = (&mut l.k, &mut l.v);
                rayon::join(|| ks.store(cfg, k, kv_dim), || vs.store(cfg, v, kv_dim));
            } else {
                l.k.store(cfg, k, kv_dim);
                l.v.store(cfg, v, kv_dim);
            }
        }
        self.enforce(layer)
    }

    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        let kv = self.geom.kv_dim();
        check_append(&self.geom, layer, k, v, n)?;
        self.lower_deferred(layer);
        let l = &mut self.layers[layer];
        l.k.store(&self.cfg, k, kv);
        l.v.store(&self.cfg, v, kv);
        self.enforce(layer)
    }

    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        let stored = self.len(0);
        if stored + n > self.max_tokens {
            return Err(KvError::CapacityExceeded {
                layer: 0,
                stored: stored + n,
                limit: self.max_tokens,
            });
        }
        // the window as the budget sizes it for this step (it narrows the first time the budget binds)
        if self.base.window_share.is_some() {
            self.fit_window(self.total_budget(), n);
        }
        if self.planned() {
            return self.replan(n);
        }
        let needs: Vec<usize> = (0..self.layers.len()).map(|li| self.floor_need(li, n)).collect();
        let starved: Vec<usize> = (0..needs.len())
            .filter(|&li| needs[li] > self.layers[li].budget)
            .collect();
        if starved.is_empty() {
            return Ok(());
        }
        // A layer that cannot take the step even at the floor borrows from layers with room to spare (which
        // then shrink further), as long as the total still fits: shares weight precision, they must not strand
        // memory. Budgets only move between layers; their sum never grows.
        let total_need: usize = needs.iter().sum();
        let total_budget: usize = self.layers.iter().map(|l| l.budget).sum();
        if !self.cfg.adaptive || total_need > total_budget {
            let li = starved[0];
            return Err(KvError::OutOfBudget {
                layer: li,
                need: if self.cfg.adaptive { total_need } else { needs[li] },
                budget: if self.cfg.adaptive {
                    total_budget
                } else {
                    self.layers[li].budget
                },
                floor_bits: self.floor_bits(li).count(),
            });
        }
        let deficit: usize = starved.iter().map(|&li| needs[li] - self.layers[li].budget).sum();
        let slack: Vec<usize> = (0..needs.len())
            .map(|li| self.layers[li].budget.saturating_sub(needs[li]))
            .collect();
        let total_slack: usize = slack.iter().sum();
        let mut taken = 0usize;
        for (layer, &sl) in self.layers.iter_mut().zip(&slack) {
            if sl == 0 {
                continue;
            }
            let give = ((deficit as u128 * sl as u128).div_ceil(total_slack as u128) as usize)
                .min(sl)
                .min(deficit - taken);
            layer.budget -= give;
            taken += give;
        }
        for &li in &starved {
            self.layers[li].budget = needs[li];
        }
        debug_assert!(taken >= deficit);
        // donors shrink now so every layer is within its new budget before the step
        for (li, &sl) in slack.iter().enumerate() {
            if sl > 0 {
                self.enforce(li)?;
            }
        }
        Ok(())
    }

    fn clear(&mut self) {
        self.deferred.clear();
        (self.cfg.window, self.cfg.window_bits) = (self.base.window, self.base.window_bits);
        for l in &mut self.layers {
            for s in [&mut l.k, &mut l.v] {
                s.sink.clear();
                s.window = s.window.empty_like(self.base.window_bits);
                s.body = s.body.empty_like(self.base.body_start_bits());
            }
        }
        self.fit_window(self.total_budget(), 0);
    }

    fn truncate(&mut self, tokens: usize) {
        self.deferred.clear();
        // Only whole segments can be rolled back exactly; tokens in a flushed/shrunk body stay as they are.
        for l in &mut self.layers {
            for s in [&mut l.k, &mut l.v] {
                let (ns, nb) = (s.sink.len(), s.body.len());
                if tokens <= ns {
                    s.sink.truncate(tokens);
                    s.body.truncate(0);
                    s.window.truncate(0);
                } else if tokens <= ns + nb {
                    s.body.truncate(tokens - ns);
                    s.window.truncate(0);
                } else {
                    s.window.truncate(tokens - ns - nb);
                }
            }
        }
    }

    fn true_bytes(&self) -> usize {
        (0..self.layers.len()).map(|l| self.layer_true_bytes(l)).sum()
    }

    fn payload_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.k.payload() + l.v.payload()).sum()
    }

    /// The narrower of each layer's K and V bodies (they differ only in planned stores).
    fn layer_bits(&self) -> Vec<u32> {
        self.layers
            .iter()
            .map(|l| l.k.body.bits.min(l.v.body.bits).count())
            .collect()
    }

    fn layer_kv_bits(&self) -> Vec<[u32; 2]> {
        self.layers
            .iter()
            .map(|l| [l.k.body.bits.count(), l.v.body.bits.count()])
            .collect()
    }

    fn set_layer_budgets(&mut self, budgets: &[usize]) -> Result<(), KvError> {
        if budgets.len() != self.layers.len() {
            return Err(KvError::BadBudgets {
                what: "layer budgets",
                expected: self.layers.len(),
                got: budgets.len(),
            });
        }
        self.deferred.clear();
        for (l, &b) in self.layers.iter_mut().zip(budgets) {
            l.budget = b;
        }
        // Only layers over their budget have work; those are lowered in parallel (one pass each), the rest are
        // not touched (this runs every engine step, and most steps change nothing).
        let (cfg, geom) = (&self.cfg, self.geom);
        let over: Vec<(usize, &mut Layer)> = self
            .layers
            .iter_mut()
            .enumerate()
            .filter(|(_, l)| charged_bytes(cfg, l) > l.budget)
            .collect();
        let results: Vec<Enforced> = if over.len() > 1 {
            over.into_par_iter()
                .map(|(li, l)| enforce_layer(cfg, geom, li, l))
                .collect()
        } else {
            over.into_iter()
                .map(|(li, l)| enforce_layer(cfg, geom, li, l))
                .collect()
        };
        self.tally(results)
    }

    fn method(&self) -> String {
        self.cfg.name.clone()
    }

    fn floor_bytes(&self, ahead: usize) -> usize {
        (0..self.layers.len()).map(|li| self.floor_need(li, ahead)).sum()
    }

    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        self.fit_window(total, ahead);
        if self.cfg.plans_widths() {
            self.total = Some(total);
            return self.replan(ahead);
        }
        let shapes: Vec<Shape> = (0..self.layers.len()).map(|li| self.shape(li)).collect();
        let budgets = self.split_budget(&shapes, total, shares, ahead)?;
        self.set_layer_budgets(&budgets)
    }

    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        let layers = self
            .layers
            .iter()
            .map(|l| Ok((l.budget, [l.k.segments(), l.v.segments()])));
        write_spill(out, &self.cfg.name, self.requants, layers)
    }

    /// Layer by layer: a first pass checks the whole file and notes each layer's shape (one layer in memory at
    /// a time), the budget is split over those shapes as `set_total_budget` would, and the second pass lowers
    /// each layer to its share as soon as it is read — the cache never holds more than `total` plus the one
    /// layer being lowered, as during any shrink.
    fn restore_within(
        &mut self,
        data: &[u8],
        total: usize,
        shares: Option<&[f64]>,
        ahead: usize,
    ) -> Result<(), KvError> {
        self.deferred.clear();
        let base = self.base.clone();
        let mut spilled = Vec::with_capacity(self.layers.len());
        let mut held = None;
        let mut r = SpillLayers::new(data, &base, self.geom, base.group)?;
        while let Some(l) = r.next_layer()? {
            let [k, v] = &l.sides;
            if !k[2].is_empty() {
                held = Some(k[2].bits);
            }
            spilled.push(([k[0].len(), k[1].len(), k[2].len()], [k[1].bits, v[1].bits]));
        }
        r.finish()?;
        // the window as this budget sizes it: each layer's window is narrowed and capped as it is read
        let tokens = spilled.first().map_or(0, |(lens, _)| lens.iter().sum::<usize>()) + ahead;
        (self.cfg.window, self.cfg.window_bits) = base.window_within(self.geom, total, tokens, held);
        let wb = self.cfg.window_bits;
        let shapes: Vec<_> = spilled
            .into_iter()
            .map(|([s, b, w], [kb, vb])| {
                let (b, w) = flushed(b, w, self.cfg.window);
                ([s, b, w], [kb.min(wb), vb.min(wb)])
            })
            .collect();
        let cfg = self.cfg.clone();
        // per layer: budget and, when planned, the widths its bodies go down to as it is read
        let plan: Vec<(usize, Option<[Bits; 2]>)> = if cfg.plans_widths() {
            self.total = Some(total);
            let p = self.plan_layers(&shapes, total, ahead)?;
            p.into_iter().map(|(b, w)| (b, Some(w))).collect()
        } else {
            let simple: Vec<Shape> = shapes.iter().map(|&(lens, [k, _])| (lens, k)).collect();
            let budgets = self.split_budget(&simple, total, shares, ahead)?;
            budgets.into_iter().map(|b| (b, None)).collect()
        };
        let mut r = SpillLayers::new(data, &base, self.geom, base.group)?;
        self.requants = r.requants;
        let mut li = 0;
        while let Some(l) = r.next_layer()? {
            let (budget, widths) = plan[li];
            let mut layer = Layer { budget, ..l.into() };
            let narrowed = layer.k.fit_window(&cfg) + layer.v.fit_window(&cfg);
            self.requants = self.requants.saturating_add(narrowed as u64);
            if let Some([kb, vb]) = widths {
                let n = layer.k.body.shrink_to(kb, cfg.shift) + layer.v.body.shrink_to(vb, cfg.shift);
                self.requants = self.requants.saturating_add(n as u64);
            }
            self.layers[li] = layer;
            self.enforce(li)?;
            li += 1;
        }
        r.finish()
    }

    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let (requants, spilled) = read_spill(data, &self.base, self.geom, self.base.group)?;
        self.deferred.clear();
        self.layers = spilled.into_iter().map(Layer::from).collect();
        self.requants = requants;
        // as spilled: the window's width as held, its size for the restored budgets but never below what it holds
        let budgets = self.layers.iter().fold(0usize, |a, l| a.saturating_add(l.budget));
        let held = self.layers.iter().map(|l| l.k.window.len() + 1).max().unwrap_or(0);
        let bits = self.layers.first().map_or(self.base.window_bits, |l| l.k.window.bits);
        let fits = self.base.window_tokens_at(self.geom, budgets, bits);
        (self.cfg.window, self.cfg.window_bits) = (fits.max(held).min(self.base.window), bits);
        Ok(())
    }

    fn requantizations(&self) -> u64 {
        self.requants
    }
}

#[cfg(test)]
mod elastic_tests;
#[cfg(test)]
mod plan_tests;
#[cfg(test)]
mod share_tests;
#[cfg(test)]
mod tests;
