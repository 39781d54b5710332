//! A sequence's KV cache in device memory (feature `cuda-kernels`): the PM-KVQ layout (16-bit sink, body pages at
//! the layer's width, 16-bit window) or pages of raw f16 rows for the `fp16` reference, plus the fixed-width
//! `rtn:N` baselines as pages at their width.
//!
//! The arithmetic is the CPU store's, on the device: tokens are written by `pk_kv_store` (which quantizes with the
//! same `pmkvq_quantize_group` as `kv_quant.cu`), a flushed window chunk and a body over its budget are lowered by
//! `pmkvq_kv_shrink` (ERS), and the forward pass reads the segments with `pk_attention`. A step is `prepare`
//! (slots for the new tokens, the segment table attention reads) then `commit` (lengths, the flushed chunk lowered
//! to the body's width, budgets enforced). Accounting is in allocated device bytes: the sink and window are
//! allocated whole when first used, body pages exactly, so `true_bytes` is what cuMemAlloc handed out for this
//! sequence. Spills use the CPU stores' formats, so a spilled sequence restores on either side bit-exactly.

use super::cuda::{DstArg, Gpu, SegArg};
use super::GpuError;
use crate::kvcache::quant::{PackedRows, ShiftMode};
use crate::kvcache::spill::{Reader, Writer};
use crate::kvcache::{KvError, KvGeometry, KvMethod, KvStore, MethodSpec, PmkvqConfig, Quantizer};
use half::f16;
use std::sync::Arc;

mod inputs;
mod rows;
use inputs::Inputs;
use rows::{commit_pages, paged_slots, Pair, Rows, Shape};

fn gpu_err(e: GpuError) -> KvError {
    KvError::Corrupt(format!("device: {e}"))
}

/// Tokens per page of the paged (fp16, rtn) bodies.
const PAGE_TOKENS: usize = 256;

#[derive(Default)]
struct Layer {
    sink: Option<Pair>,
    /// Body pages, oldest first, all at the layer's width.
    body: Vec<Pair>,
    window: Option<Pair>,
    /// Between prepare and commit: the flushing chunk at 16 bits (old window + the first new tokens).
    chunk: Option<Pair>,
    /// Tokens in sink, body, window.
    sink_len: usize,
    body_len: usize,
    win_len: usize,
    bits: u32,
    budget: usize,
}

#[derive(Clone)]
enum Kind {
    /// Raw f16 pages (the reference).
    Fp16,
    /// The PM-KVQ layout (sink/body/window), adaptive or fixed width.
    Pmkvq(PmkvqConfig),
}

/// What a step needs from one layer of one store.
pub struct LayerPlan {
    pub segs: Vec<SegArg>,
    pub stored: usize,
    pub dsts: Vec<DstArg>,
}

pub struct DeviceStore {
    gpu: Arc<Gpu>,
    geom: KvGeometry,
    kind: Kind,
    shape: Shape,
    layers: Vec<Layer>,
    max_tokens: usize,
    /// What the store does to its inputs first: key scales, rotation.
    inputs: Inputs,
    requants: u64,
    name: String,
}

impl DeviceStore {
    /// A device store for `spec`: the methods with a device layout are `fp16`, `pmkvq` (every shift mode, with
    /// its calibrated shares and key scales) and `rtn:N`; the others are refused with a message naming them.
    pub fn new(gpu: Arc<Gpu>, spec: &MethodSpec, geom: KvGeometry, max_tokens: usize) -> Result<Self, KvError> {
        let refuse = |what: &'static str| KvError::Unsupported {
            what,
            method: spec.method.to_string(),
        };
        let no_layout = "run on the GPU (device caches: fp16, pmkvq, rtn:N)";
        let (kind, group) = match &spec.method {
            KvMethod::Fp16 => (Kind::Fp16, geom.head_dim),
            KvMethod::Pmkvq(c) => (Kind::Pmkvq(c.clone()), c.group),
            KvMethod::Rtn(b) => (Kind::Pmkvq(PmkvqConfig::rtn(*b)), 0),
            _ => return Err(refuse(no_layout)),
        };
        // what the device cache does not do yet, in the order it is reported
        let pm = |f: fn(&PmkvqConfig) -> bool| matches!(&spec.method, KvMethod::Pmkvq(c) if f(c));
        let refusals = [
            (
                pm(|c| c.sensitivity.is_some()),
                "plan its widths on the sensitivity on the GPU (the device cache splits by shares)",
            ),
            (
                pm(|c| c.elastic_window),
                "let its window yield to the floor on the GPU (device layers keep the full window)",
            ),
            (
                pm(|c| c.window_bits != crate::kvcache::quant::Bits::B16),
                "keep its window below 16 bits on the GPU (device windows are 16-bit)",
            ),
            (
                pm(|c| c.window_share.is_some()),
                "cap its window by the budget on the GPU (device windows keep their size)",
            ),
        ];
        if let Some((_, what)) = refusals.into_iter().find(|(refused, _)| *refused) {
            return Err(refuse(what));
        }
        if let Kind::Pmkvq(c) = &kind {
            if c.quantizer != Quantizer::Asymmetric || c.llama_semantics || c.payload_accounting {
                return Err(refuse(no_layout));
            }
        }
        let g = if group == 0 { geom.head_dim } else { group };
        if g == 0 || !g.is_multiple_of(16) || !geom.head_dim.is_multiple_of(g) || g > 256 {
            return Err(KvError::BadGroup {
                method: spec.method.to_string(),
                group: g,
                head_dim: geom.head_dim,
            });
        }
        if geom.head_dim > 128 || geom.kv_heads == 0 || !geom.q_heads.is_multiple_of(geom.kv_heads) {
            return Err(refuse("run on the GPU (head_dim up to 128 and whole GQA groups)"));
        }
        let shape = Shape {
            gpt: geom.kv_dim() / g,
            g,
            kv_dim: geom.kv_dim(),
        };
        let init = match &kind {
            Kind::Fp16 => 0,
            Kind::Pmkvq(c) => c.init_bits.count(),
        };
        let layers = (0..geom.layers)
            .map(|_| Layer {
                bits: init,
                budget: usize::MAX,
                ..Layer::default()
            })
            .collect();
        let inputs = Inputs::new(&gpu, spec, geom)?;
        let mut store = DeviceStore {
            // named as the host store with the same spec names itself
            name: format!(
                "{}{}",
                spec.method,
                if spec.rotate {
                    crate::kvcache::rotate::ROTATED_SUFFIX
                } else {
                    ""
                }
            ),
            inputs,
            gpu,
            geom,
            kind,
            shape,
            layers,
            max_tokens,
            requants: 0,
        };
        if let Some(b) = spec.budget {
            store.set_total_budget(b, spec.shares.as_deref(), 0)?;
        }
        Ok(store)
    }

    fn cfg(&self) -> Option<&PmkvqConfig> {
        match &self.kind {
            Kind::Pmkvq(c) => Some(c),
            Kind::Fp16 => None,
        }
    }

    fn layer_bytes(&self, li: usize) -> usize {
        let l = &self.layers[li];
        let s = self.shape;
        l.sink.as_ref().map_or(0, |p| p.bytes(s))
            + l.body.iter().map(|p| p.bytes(s)).sum::<usize>()
            + l.window.as_ref().map_or(0, |p| p.bytes(s))
            + l.chunk.as_ref().map_or(0, |p| p.bytes(s))
    }

    /// Device bytes of layer `li` after `n` more tokens with its body at `bits` (the allocation rules above).
    fn projected(&self, li: usize, n: usize, bits: u32) -> usize {
        let l = &self.layers[li];
        let s = self.shape;
        let side = |b: u32| 2 * s.token_bytes(b);
        match &self.kind {
            Kind::Fp16 => (l.body_len + n).div_ceil(PAGE_TOKENS) * PAGE_TOKENS * side(0),
            Kind::Pmkvq(c) if c.window == 0 => {
                // rtn: a sink, then pages at the fixed width
                let sink = (l.sink_len + n).min(c.sink);
                let rest = l.body_len + n - (sink - l.sink_len);
                let sink_b = if c.sink > 0 && l.sink_len + n > 0 {
                    c.sink * side(16)
                } else {
                    0
                };
                sink_b + rest.div_ceil(PAGE_TOKENS) * PAGE_TOKENS * side(bits)
            }
            Kind::Pmkvq(c) => {
                let sink = (l.sink_len + n).min(c.sink);
                let rem = n - (sink - l.sink_len);
                let tot = l.win_len + rem;
                let flushed = tot / c.window * c.window;
                let sink_b = if c.sink > 0 && l.sink_len + n > 0 {
                    c.sink * side(16)
                } else {
                    0
                };
                let win_b = if l.window.is_some() || tot > 0 {
                    c.window * side(16)
                } else {
                    0
                };
                sink_b + win_b + (l.body_len + flushed) * side(bits)
            }
        }
    }

    fn floor_bits(&self, li: usize) -> u32 {
        match &self.kind {
            Kind::Pmkvq(c) if c.adaptive => c.floor_bits.count(),
            _ => self.layers[li].bits,
        }
    }

    fn shift(&self) -> ShiftMode {
        self.cfg().map_or(ShiftMode::Equivalent, |c| c.shift)
    }

    /// Lower layer `li`'s body until the layer fits its budget.
    fn enforce(&mut self, li: usize) -> Result<(), KvError> {
        loop {
            let bytes = self.layer_bytes(li);
            let floor = self.floor_bits(li);
            let (shape, mode) = (self.shape, self.shift());
            let l = &mut self.layers[li];
            if bytes <= l.budget {
                return Ok(());
            }
            if l.body_len == 0 || l.bits <= floor || l.bits <= 2 {
                return Err(KvError::OutOfBudget {
                    layer: li,
                    need: bytes,
                    budget: l.budget,
                    floor_bits: floor,
                });
            }
            for p in &mut l.body {
                p.k.shrink(&self.gpu, shape, mode).map_err(gpu_err)?;
                p.v.shrink(&self.gpu, shape, mode).map_err(gpu_err)?;
            }
            l.bits /= 2;
            self.requants = self.requants.saturating_add(1);
        }
    }

    fn kinv(&self, li: usize) -> u64 {
        self.inputs.store_kinv(&self.gpu, li)
    }

    /// Device address of layer `li`'s rotation signs (0 when this store does not rotate).
    pub fn rotation_ptr(&self, li: usize) -> u64 {
        self.inputs.signs(&self.gpu, li, self.geom.head_dim)
    }

    /// (λ, 1/λ) device addresses for layer `li` (0, 0 without reparameterization).
    pub fn key_scale_ptrs(&self, li: usize) -> (u64, u64) {
        self.inputs.key_scales(&self.gpu, li)
    }

    /// Slots for `n` new tokens in layer `li` and the segments attention reads before they are stored.
    pub fn prepare(&mut self, li: usize, n: usize) -> Result<LayerPlan, KvError> {
        let kinv = self.kinv(li);
        // disjoint borrows: the decode step calls this per layer and sequence, so nothing is cloned
        let Self {
            gpu,
            shape: s,
            kind,
            layers,
            ..
        } = self;
        let s = *s;
        let l = &mut layers[li];
        let mut dsts = Vec::with_capacity(n);
        let mut segs = Vec::new();
        let stored = l.sink_len + l.body_len + l.win_len;
        let e = gpu_err;
        match kind {
            Kind::Fp16 => {
                for p in &l.body {
                    segs.push(p.seg(gpu, s, p.k.len));
                }
                paged_slots(l, gpu, s, 0, n, kinv, &mut dsts).map_err(e)?;
            }
            Kind::Pmkvq(c) => {
                if c.sink > 0 && l.sink_len > 0 {
                    segs.push(l.sink.as_ref().expect("sink").seg(gpu, s, l.sink_len));
                }
                for p in &l.body {
                    segs.push(p.seg(gpu, s, p.k.len));
                }
                let m = c.sink.saturating_sub(l.sink_len).min(n);
                if m > 0 {
                    if l.sink.is_none() {
                        l.sink = Some(Pair::alloc(gpu, s, 16, c.sink).map_err(e)?);
                    }
                    let p = l.sink.as_ref().expect("sink");
                    for i in 0..m {
                        dsts.push(p.dst(gpu, s, l.sink_len + i, kinv));
                    }
                }
                let rem = n - m;
                if c.window == 0 {
                    // rtn: pages at the fixed width
                    let bits = l.bits;
                    paged_slots(l, gpu, s, bits, rem, kinv, &mut dsts).map_err(e)?;
                } else if rem > 0 {
                    let w = l.win_len;
                    let tot = w + rem;
                    let flushed = tot / c.window * c.window;
                    if l.window.is_none() {
                        l.window = Some(Pair::alloc(gpu, s, 16, c.window).map_err(e)?);
                    }
                    if flushed == 0 {
                        let p = l.window.as_ref().expect("window");
                        if w > 0 {
                            segs.push(p.seg(gpu, s, w));
                        }
                        for i in 0..rem {
                            dsts.push(p.dst(gpu, s, w + i, kinv));
                        }
                    } else {
                        let mut chunk = Pair::alloc(gpu, s, 16, flushed).map_err(e)?;
                        let win = l.window.as_ref().expect("window");
                        win.k.copy_into(gpu, s, w, &mut chunk.k).map_err(e)?;
                        win.v.copy_into(gpu, s, w, &mut chunk.v).map_err(e)?;
                        if w > 0 {
                            segs.push(chunk.seg(gpu, s, w));
                        }
                        for i in 0..flushed - w {
                            dsts.push(chunk.dst(gpu, s, w + i, kinv));
                        }
                        for i in 0..tot - flushed {
                            dsts.push(win.dst(gpu, s, i, kinv));
                        }
                        l.chunk = Some(chunk);
                    }
                } else if l.win_len > 0 {
                    segs.push(l.window.as_ref().expect("window").seg(gpu, s, l.win_len));
                }
            }
        }
        debug_assert_eq!(dsts.len(), n);
        let mut start = 0;
        for seg in &mut segs {
            seg.start = start;
            start += seg.len;
        }
        debug_assert_eq!(start as usize, stored);
        Ok(LayerPlan { segs, stored, dsts })
    }

    /// After the step's kernels: the new tokens are in their slots; fix lengths, lower a flushed chunk to the
    /// body's width and append it as a page, then enforce the layer's budget.
    pub fn commit(&mut self, li: usize, n: usize) -> Result<(), KvError> {
        let mode = self.shift();
        let Self {
            gpu,
            shape: s,
            kind,
            layers,
            ..
        } = self;
        let s = *s;
        let l = &mut layers[li];
        match kind {
            Kind::Fp16 => commit_pages(l, n),
            Kind::Pmkvq(c) => {
                let m = c.sink.saturating_sub(l.sink_len).min(n);
                l.sink_len += m;
                if let Some(p) = &mut l.sink {
                    p.k.len = l.sink_len;
                    p.v.len = l.sink_len;
                }
                let rem = n - m;
                if c.window == 0 {
                    commit_pages(l, rem);
                } else if let Some(mut chunk) = l.chunk.take() {
                    let tot = l.win_len + rem;
                    let flushed = chunk.k.cap;
                    chunk.k.len = flushed;
                    chunk.v.len = flushed;
                    while chunk.k.bits > l.bits {
                        chunk.k.shrink(gpu, s, mode).map_err(gpu_err)?;
                        chunk.v.shrink(gpu, s, mode).map_err(gpu_err)?;
                    }
                    l.body.push(chunk);
                    l.body_len += flushed;
                    l.win_len = tot - flushed;
                } else {
                    l.win_len += rem;
                }
                if let Some(p) = &mut l.window {
                    p.k.len = l.win_len;
                    p.v.len = l.win_len;
                }
            }
        }
        self.enforce(li)
    }

    /// Undo `prepare` for layer `li` when the step failed before its kernels ran (the slots hold nothing).
    pub fn abandon(&mut self, li: usize) {
        let l = &mut self.layers[li];
        l.chunk = None;
        while l.body.last().is_some_and(|p| p.k.len == 0) {
            l.body.pop();
        }
    }

    pub fn group(&self) -> usize {
        self.shape.g
    }
}

impl KvStore for DeviceStore {
    fn geometry(&self) -> KvGeometry {
        self.geom
    }
    fn len(&self, layer: usize) -> usize {
        self.layers
            .get(layer)
            .map_or(0, |l| l.sink_len + l.body_len + l.win_len)
    }
    fn attend_and_store(
        &mut self,
        _layer: usize,
        _q: &[f32],
        _k: &[f32],
        _v: &[f32],
        _n: usize,
        _out: &mut [f32],
    ) -> Result<(), KvError> {
        Err(KvError::Unsupported {
            what: "attend from the CPU forward pass (it lives on the GPU; run the model on the GPU)",
            method: self.name.clone(),
        })
    }
    fn append(&mut self, layer: usize, k: &[f32], v: &[f32], n: usize) -> Result<(), KvError> {
        crate::kvcache::check_append(&self.geom, layer, k, v, n)?;
        if n == 0 {
            return Ok(());
        }
        // a rotated store is handed what the host store's taps would hand its inner store: R(k/λ), R(v)
        let rotated = self.inputs.host_rotated(layer, k, v);
        let (k, v) = rotated.as_ref().map_or((k, v), |(k, v)| (k.as_slice(), v.as_slice()));
        self.reserve_layer(layer, n)?;
        let plan = self.prepare(layer, n)?;
        let r = self
            .gpu
            .store_tokens(&plan.dsts, k, v, self.geom.kv_dim(), self.shape.g);
        if let Err(e) = r {
            self.abandon(layer);
            return Err(gpu_err(e));
        }
        self.commit(layer, n)
    }
    fn clear(&mut self) {
        let init = self.cfg().map_or(0, |c| c.init_bits.count());
        for l in &mut self.layers {
            *l = Layer {
                bits: init,
                budget: l.budget,
                ..Layer::default()
            };
        }
    }
    fn truncate(&mut self, tokens: usize) {
        if tokens >= self.len(0) {
            return;
        }
        if tokens == 0 {
            self.clear();
            return;
        }
        // Only the fp16 pages roll back token by token; a PM-KVQ cache keeps its flushed body (as the CPU's).
        if matches!(self.kind, Kind::Fp16) {
            for l in &mut self.layers {
                let mut keep = tokens;
                l.body.retain_mut(|p| {
                    if keep == 0 {
                        return false;
                    }
                    let k = keep.min(p.k.len);
                    p.k.len = k;
                    p.v.len = k;
                    keep -= k;
                    true
                });
                l.body_len = tokens;
            }
        } else {
            for l in &mut self.layers {
                let (ns, nb) = (l.sink_len, l.body_len);
                if tokens > ns + nb {
                    l.win_len = tokens - ns - nb;
                    if let Some(p) = &mut l.window {
                        p.k.len = l.win_len;
                        p.v.len = l.win_len;
                    }
                }
            }
        }
    }
    fn true_bytes(&self) -> usize {
        (0..self.layers.len()).map(|li| self.layer_bytes(li)).sum()
    }
    fn reserve(&mut self, n: usize) -> Result<(), KvError> {
        for li in 0..self.layers.len() {
            self.reserve_layer(li, n)?;
        }
        Ok(())
    }
    fn layer_bits(&self) -> Vec<u32> {
        self.layers
            .iter()
            .map(|l| if l.bits == 0 { 16 } else { l.bits })
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
        for (l, &b) in self.layers.iter_mut().zip(budgets) {
            l.budget = b;
        }
        let mut first = None;
        for li in 0..self.layers.len() {
            if let Err(e) = self.enforce(li) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
    fn method(&self) -> String {
        self.name.clone()
    }
    fn floor_bytes(&self, ahead: usize) -> usize {
        (0..self.layers.len())
            .map(|li| self.projected(li, ahead, self.floor_bits(li)))
            .sum()
    }
    fn set_total_budget(&mut self, total: usize, shares: Option<&[f64]>, ahead: usize) -> Result<(), KvError> {
        let floors = (0..self.layers.len())
            .map(|li| self.projected(li, ahead, self.floor_bits(li)))
            .collect();
        let current = (0..self.layers.len())
            .map(|li| self.projected(li, ahead, self.layers[li].bits))
            .collect();
        let budgets = crate::kvcache::split_total_budget(floors, current, total, shares, self.floor_bits(0))?;
        self.set_layer_budgets(&budgets)
    }
    fn spill_to(&self, out: &mut dyn std::io::Write) -> Result<(), KvError> {
        match &self.kind {
            Kind::Fp16 => {
                let mut w = Writer::new(out, "fp16");
                for side in 0..2 {
                    for l in &self.layers {
                        let mut vals = Vec::with_capacity(l.body_len * self.geom.kv_dim());
                        for p in &l.body {
                            let r = if side == 0 { &p.k } else { &p.v };
                            let raw = self
                                .gpu
                                .dtoh(&r.data, r.len * self.shape.data_bytes(0))
                                .map_err(gpu_err)?;
                            vals.extend(raw.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()));
                        }
                        w.f32s(&vals);
                    }
                }
                w.finish()
            }
            Kind::Pmkvq(c) => {
                // one layer on the host at a time
                let layers = (0..self.layers.len()).map(|li| Ok((self.layers[li].budget, self.download_layer(li)?)));
                crate::kvcache::write_spill(out, &c.name, self.requants, layers)
            }
        }
    }
    fn restore(&mut self, data: &[u8]) -> Result<(), KvError> {
        let (gpu, s, g) = (self.gpu.clone(), self.shape, self.geom);
        match self.kind.clone() {
            Kind::Fp16 => {
                let mut r = Reader::new(data, "fp16")?;
                let mut sides = Vec::with_capacity(2);
                for _ in 0..2 {
                    let mut v = Vec::with_capacity(g.layers);
                    for _ in 0..g.layers {
                        v.push(r.f32s()?);
                    }
                    sides.push(v);
                }
                r.finish()?;
                let n = sides[0][0].len() / g.kv_dim().max(1);
                if sides.iter().flatten().any(|x| x.len() != n * g.kv_dim()) {
                    return Err(KvError::Corrupt("layers hold different token counts".into()));
                }
                self.clear();
                for (li, (k, v)) in sides[0].iter().zip(&sides[1]).enumerate() {
                    self.append(li, k, v, n)?;
                }
                Ok(())
            }
            Kind::Pmkvq(c) => {
                let (requants, spilled) = crate::kvcache::read_spill(data, &c, g, s.g)?;
                let mut layers = Vec::with_capacity(spilled.len());
                for sl in spilled {
                    let [k, v] = &sl.sides;
                    let up = |rows: &PackedRows, cap: usize| Rows::upload(&gpu, s, rows, cap).map_err(gpu_err);
                    let pair = |i: usize, cap: usize| -> Result<Pair, KvError> {
                        Ok(Pair {
                            k: up(&k[i], cap)?,
                            v: up(&v[i], cap)?,
                        })
                    };
                    let mut l = Layer {
                        bits: k[1].bits.count(),
                        budget: sl.budget,
                        sink_len: k[0].len(),
                        body_len: k[1].len(),
                        win_len: k[2].len(),
                        ..Layer::default()
                    };
                    if l.sink_len > 0 {
                        l.sink = Some(pair(0, c.sink)?);
                    }
                    if l.body_len > 0 {
                        l.body.push(pair(1, k[1].len())?);
                    }
                    if l.win_len > 0 {
                        l.window = Some(pair(2, c.window)?);
                    }
                    layers.push(l);
                }
                self.layers = layers;
                self.requants = requants;
                Ok(())
            }
        }
    }
    fn requantizations(&self) -> u64 {
        self.requants
    }
    fn as_any_mut(&mut self) -> Option<&mut dyn std::any::Any> {
        Some(self)
    }
}

impl DeviceStore {
    fn reserve_layer(&mut self, li: usize, n: usize) -> Result<(), KvError> {
        let stored = self.len(li);
        if stored + n > self.max_tokens {
            return Err(KvError::CapacityExceeded {
                layer: li,
                stored: stored + n,
                limit: self.max_tokens,
            });
        }
        let need = self.projected(li, n, self.floor_bits(li));
        if need > self.layers[li].budget {
            return Err(KvError::OutOfBudget {
                layer: li,
                need,
                budget: self.layers[li].budget,
                floor_bits: self.floor_bits(li),
            });
        }
        Ok(())
    }
}
