//! The forward pass on the GPU (feature `cuda-kernels`): the same steps as `model/forward.rs` (the CPU
//! specification), over weights uploaded once in their GGUF blocks and the sequences' [`DeviceStore`]s.
//!
//! One engine step is one batched pass over every sequence's new tokens (decode tokens and prefill chunks
//! alike): per layer, RMSNorm (+ 8-bit activation blocks), the fused q/k/v matmul, RoPE, attention of every row
//! over its own sequence's segments plus its call's tokens, the K/V store, the output projection added to the
//! residual, RMSNorm, gate/up, SwiGLU, down added to the residual. The segment and slot tables of every layer
//! are built on the host once per step and uploaded in one copy each, so a layer costs a fixed number of
//! launches whatever the batch (≈ 11 per layer), and only the logits come back.

use super::cuda::{drv, DstArg, Gpu, OutArg, SegArg, SeqArg};
use super::kv::DeviceStore;
use super::GpuError;
use crate::kvcache::{KvError, KvGeometry, KvStore, MethodSpec};
use crate::model::{Backend, LogitsMode, Model, ModelConfig, ModelError, Projection, SeqInput};
use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use std::sync::Arc;

mod diag;
mod launch;
mod step;
mod weights;
pub use diag::StepProfile;
use launch::Source;
pub use launch::TOKEN_TILE;
use step::{as_bytes, split_plan, BlobLayout, Capacity, StepBuffers, StepPlan, MAX_GRAPHS};
use weights::{DevLayer, DevLinear, DevProj};

fn gerr(e: GpuError) -> ModelError {
    ModelError::Input(format!("GPU: {e}"))
}

/// The model's weights on one GPU, and the kernels that run it.
pub struct GpuModel {
    gpu: Arc<Gpu>,
    cfg: ModelConfig,
    embed: DevLinear,
    layers: Vec<DevLayer>,
    norm: CudaSlice<f32>,
    head: Option<DevLinear>,
    rope_factors: Vec<f32>,
    weight_bytes: usize,
    ffn: usize,
    /// The step buffers (activations, tables, logits) and captured decode graphs; one step at a time.
    step: std::sync::Mutex<Option<StepBuffers>>,
    /// Diagnostics: when set, the residual stream is copied out after the embedding, after layer 0's attention
    /// and after every layer (see [`GpuModel::trace_hidden`]).
    dumps: std::sync::Mutex<Option<Vec<Vec<f32>>>>,
    /// Profiling: when set, an event is recorded after every launch, labelled with the kernel.
    profile: std::sync::Mutex<Option<Vec<(&'static str, cudarc::driver::CudaEvent)>>>,
    /// Set while `trace_hidden` or `profile_step` runs: the launches check it before taking either lock above.
    diagnosing: std::sync::atomic::AtomicBool,
    /// Whether decode steps may replay captured graphs (on unless `PMKVQ_NO_CUDA_GRAPHS` is set).
    graphs_on: std::sync::atomic::AtomicBool,
    /// Graphs captured and replayed since load.
    graph_counts: [std::sync::atomic::AtomicU64; 2],
    /// The launch plan (see [`GpuModel::set_launch_plan`]): unfused launches; query heads per attention warp.
    unfused: std::sync::atomic::AtomicBool,
    heads_per_warp: std::sync::atomic::AtomicUsize,
}

/// An activation in f32 and (when a block-weight matmul reads it) as 8-bit blocks.
#[derive(Clone, Copy)]
struct Act {
    f: u64,
    qs: u64,
    qd: u64,
    qsum: u64,
}

struct Scratch {
    x: CudaSlice<f32>,
    hn: CudaSlice<f32>,
    qs: CudaSlice<i8>,
    qd: CudaSlice<f32>,
    qsum: CudaSlice<f32>,
    q: CudaSlice<f32>,
    k: CudaSlice<f32>,
    v: CudaSlice<f32>,
    attn: CudaSlice<f32>,
    gate: CudaSlice<f32>,
    up: CudaSlice<f32>,
    act: CudaSlice<f32>,
    work: CudaSlice<f32>,
}

/// Query heads one `pk_attention` warp serves (its `PK_GQA`): the heads of a GQA group share what it decodes.
pub const ATTENTION_HEADS: usize = 4;

/// `pk_attention` blocks per (row, split): each KV head's group of query heads in blocks of `gqa`.
fn attention_blocks(q_heads: usize, kv_heads: usize, gqa: usize) -> usize {
    kv_heads * (q_heads / kv_heads).div_ceil(gqa)
}

/// Threads of a `pk_attn_combine` block (its `PK_COMBINE_THREADS`: the kernel's shared arrays are that long).
pub const COMBINE_THREADS: u32 = 256;

fn cfg1(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl GpuModel {
    /// Upload `model`'s weights to `gpu`. Fails with a message naming what the device path cannot run.
    pub fn new(gpu: Arc<Gpu>, model: &Model) -> Result<GpuModel, ModelError> {
        let c = &model.config;
        let ffn = model.layers.first().map_or(0, |l| match &l.gate_up {
            Projection::Fused { splits, .. } => splits[0],
            Projection::Split(p) => p[0].rows,
        });
        let unsupported =
            |what: String| ModelError::Input(format!("the GPU forward pass cannot run this model: {what}"));
        for (name, v) in [
            ("hidden size", c.hidden),
            ("q dimension", c.heads * c.head_dim),
            ("ffn size", ffn),
        ] {
            if v == 0 || !v.is_multiple_of(32) {
                return Err(unsupported(format!("{name} {v} is not a multiple of 32")));
            }
        }
        if c.head_dim > 128 || !c.head_dim.is_multiple_of(2) || c.kv_heads == 0 || !c.heads.is_multiple_of(c.kv_heads) {
            return Err(unsupported(format!(
                "head_dim {} (at most 128, even) with {} query / {} kv heads",
                c.head_dim, c.heads, c.kv_heads
            )));
        }
        let extras = c.sliding.is_some() || c.arch.post_norms() || c.arch.gelu() || c.embed_scale.is_some();
        if extras || model.layers.iter().any(|l| l.qk_norm.is_some()) {
            return Err(unsupported(format!(
                "{:?}'s q/k norms (or windows, post-norms, GeGLU) have no CUDA kernel yet",
                c.arch
            )));
        }
        let up = |v: &[f32]| gpu.upload(v).map_err(gerr);
        let mut layers = Vec::with_capacity(model.layers.len());
        for (i, l) in model.layers.iter().enumerate() {
            layers.push(DevLayer {
                attn_norm: up(&l.attn_norm)?,
                qkv: DevProj::upload(&gpu, &l.qkv, &format!("blk.{i}.attn_qkv"))?,
                o: DevLinear::upload(&gpu, &l.o, &format!("blk.{i}.attn_output"))?,
                ffn_norm: up(&l.ffn_norm)?,
                gate_up: DevProj::upload(&gpu, &l.gate_up, &format!("blk.{i}.ffn_gate_up"))?,
                down: DevLinear::upload(&gpu, &l.down, &format!("blk.{i}.ffn_down"))?,
            });
        }
        let embed = DevLinear::upload(&gpu, &model.embed, "token_embd")?;
        let head = match &model.lm_head {
            Some(h) => Some(DevLinear::upload(&gpu, h, "output")?),
            None => None,
        };
        let norm = up(&model.norm)?;
        let weight_bytes = layers
            .iter()
            .map(|l| l.qkv.bytes() + l.o.bytes() + l.gate_up.bytes() + l.down.bytes() + 8 * c.hidden)
            .sum::<usize>()
            + embed.bytes()
            + head.as_ref().map_or(0, DevLinear::bytes)
            + 4 * c.hidden;
        gpu.sync().map_err(gerr)?;
        Ok(GpuModel {
            gpu,
            cfg: c.clone(),
            embed,
            layers,
            norm,
            head,
            rope_factors: model.rope_factors.clone(),
            weight_bytes,
            ffn,
            step: std::sync::Mutex::new(None),
            dumps: std::sync::Mutex::new(None),
            profile: std::sync::Mutex::new(None),
            diagnosing: std::sync::atomic::AtomicBool::new(false),
            graphs_on: std::sync::atomic::AtomicBool::new(std::env::var_os("PMKVQ_NO_CUDA_GRAPHS").is_none()),
            graph_counts: Default::default(),
            unfused: std::sync::atomic::AtomicBool::new(false),
            heads_per_warp: std::sync::atomic::AtomicUsize::new(ATTENTION_HEADS),
        })
    }

    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn alloc_scratch(&self, t: usize, work: usize) -> Result<Scratch, GpuError> {
        let c = &self.cfg;
        let (h, qd, kd) = (c.hidden, c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let widest = h.max(qd).max(self.ffn);
        let g = &self.gpu;
        Ok(Scratch {
            x: g.alloc(t * h)?,
            hn: g.alloc(t * h)?,
            qs: g.alloc(t * widest)?,
            qd: g.alloc(t * widest / 32)?,
            qsum: g.alloc(t * widest / 32)?,
            q: g.alloc(t * qd)?,
            k: g.alloc(t * kd)?,
            v: g.alloc(t * kd)?,
            attn: g.alloc(t * qd)?,
            gate: g.alloc(t * self.ffn)?,
            up: g.alloc(t * self.ffn)?,
            act: g.alloc(t * self.ffn)?,
            work: g.alloc(work)?,
        })
    }

    fn forward_device(
        &self,
        seqs: &[SeqInput<'_>],
        stores: &mut [&mut DeviceStore],
        mode: LogitsMode,
        t: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let nl = self.layers.len();
        let ns = seqs.len();
        // Every store confirms it can take its tokens before any layer is touched (as the CPU path).
        for (i, (s, st)) in seqs.iter().zip(stores.iter_mut()).enumerate() {
            st.reserve(s.tokens.len()).map_err(|e| ModelError::in_sequence(i, e))?;
        }
        // Tables for every layer: segments, per-sequence entries, per-token slots.
        let mut segs: Vec<SegArg> = Vec::new();
        let mut seqtab: Vec<SeqArg> = Vec::with_capacity(nl * ns);
        let mut dsts: Vec<DstArg> = Vec::with_capacity(nl * t);
        let mut max_total = 1usize;
        let mut g_min = usize::MAX;
        let mut fail = None;
        'layers: for li in 0..nl {
            for (si, (s, st)) in seqs.iter().zip(stores.iter_mut()).enumerate() {
                let n = s.tokens.len();
                match st.prepare(li, n) {
                    Ok(plan) => {
                        let (qs, ki) = st.key_scale_ptrs(li);
                        seqtab.push(SeqArg {
                            seg_start: segs.len() as i32,
                            seg_count: plan.segs.len() as i32,
                            stored: plan.stored as i32,
                            g: st.group() as i32,
                            qscale: qs,
                            kinv: ki,
                            signs: st.rotation_ptr(li),
                        });
                        g_min = g_min.min(st.group());
                        max_total = max_total.max(plan.stored + n);
                        segs.extend(plan.segs);
                        dsts.extend(plan.dsts);
                    }
                    Err(e) => {
                        fail = Some((e, li, si));
                        break 'layers;
                    }
                }
            }
        }
        if let Some((e, _, si)) = fail {
            // prepare changes no lengths: dropping the pending chunks and empty pages undoes it
            for li in 0..nl {
                for st in stores.iter_mut() {
                    st.abandon(li);
                }
            }
            return Err(ModelError::in_sequence(si, e));
        }
        let run = self.run_layers(seqs, &segs, &seqtab, &dsts, t, max_total, g_min, mode);
        let logits = match run {
            Ok(l) => l,
            Err(e) => {
                for li in 0..nl {
                    for st in stores.iter_mut() {
                        st.abandon(li);
                    }
                }
                return Err(gerr(e));
            }
        };
        let mut first_err = None;
        for li in 0..nl {
            for (si, (s, st)) in seqs.iter().zip(stores.iter_mut()).enumerate() {
                if let Err(e) = st.commit(li, s.tokens.len()) {
                    first_err.get_or_insert(ModelError::in_sequence(si, e));
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(logits)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_layers(
        &self,
        seqs: &[SeqInput<'_>],
        segs: &[SegArg],
        seqtab: &[SeqArg],
        dsts: &[DstArg],
        t: usize,
        max_total: usize,
        g_min: usize,
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, GpuError> {
        let c = &self.cfg;
        let (qh, d) = (c.heads, c.head_dim);
        let ns = seqs.len();
        // Rows: sequence, visible fresh tokens, first row of the sequence; tokens and RoPE tables.
        let mut row_seq = Vec::with_capacity(t);
        let mut row_fresh = Vec::with_capacity(t);
        let mut row_fresh0 = Vec::with_capacity(t);
        let mut tokens = Vec::with_capacity(t);
        let half = d / 2;
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        let mut start = 0i32;
        for (si, s) in seqs.iter().enumerate() {
            for (i, (&tok, &p)) in s.tokens.iter().zip(s.positions).enumerate() {
                row_seq.push(si as i32);
                row_fresh.push(i as i32 + 1);
                row_fresh0.push(start);
                tokens.push(tok as i32);
                c.rope.angles(p as f32, &self.rope_factors, &mut cos, &mut sin);
            }
            start += s.tokens.len() as i32;
        }
        let (rows, counts) = crate::model::logit_rows(seqs, mode);
        let rows: Vec<i32> = rows.into_iter().map(|r| r as i32).collect();
        let r = rows.len();
        let (fused, gqa) = self.launch_plan();
        let (chunk, splits) = split_plan(max_total, attention_blocks(qh, c.kv_heads, gqa) * t);
        let need = Capacity {
            t,
            r,
            segs: segs.len(),
            seqs: seqtab.len(),
            dsts: dsts.len(),
            work: t * qh * splits * (2 + d),
            half,
        };
        let mut guard = self.step.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|st| !st.cap.holds(&need)) {
            let grown = guard.as_ref().map_or(need, |st| st.cap.grow(&need));
            *guard = None; // frees the old buffers (and graphs) before the new ones are taken
            *guard = Some(self.alloc_step(grown)?);
        }
        let st = guard.as_mut().expect("allocated above");
        // One host blob, one copy: every table at its fixed offset in the device blob.
        let mut blob = vec![0u8; st.layout.total];
        let put = |blob: &mut [u8], off: usize, bytes: &[u8]| blob[off..off + bytes.len()].copy_from_slice(bytes);
        put(&mut blob, st.layout.segs, as_bytes(segs));
        put(&mut blob, st.layout.seqs, as_bytes(seqtab));
        put(&mut blob, st.layout.dsts, as_bytes(dsts));
        put(&mut blob, st.layout.row_seq, as_bytes(&row_seq));
        put(&mut blob, st.layout.row_fresh, as_bytes(&row_fresh));
        put(&mut blob, st.layout.row_fresh0, as_bytes(&row_fresh0));
        put(&mut blob, st.layout.tokens, as_bytes(&tokens));
        put(&mut blob, st.layout.cos, as_bytes(&cos));
        put(&mut blob, st.layout.sin, as_bytes(&sin));
        put(&mut blob, st.layout.rows, as_bytes(&rows));
        self.gpu.htod(&blob, &mut st.blob)?;
        let plan = StepPlan {
            t,
            ns,
            r,
            chunk,
            splits,
            g_min,
            rotate: seqtab.iter().any(|s| s.signs != 0),
            fused,
            gqa,
        };
        let dumping = self.diagnosing.load(std::sync::atomic::Ordering::Relaxed)
            || !self.graphs_on.load(std::sync::atomic::Ordering::Relaxed);
        // Decode-only steps (one token per sequence) repeat the same launches with the same addresses: they
        // replay a captured CUDA graph (one launch instead of 10 per layer). Others launch directly.
        let graphable = t == ns && !dumping && st.graphs_ok;
        if graphable {
            let key = (t, ns, r, chunk, splits, g_min, plan.rotate, fused, gqa);
            if !st.graphs.contains_key(&key) {
                if st.graphs.len() >= MAX_GRAPHS {
                    st.graphs.clear();
                }
                match self.capture(st, &plan) {
                    Ok(g) => {
                        st.graphs.insert(key, g);
                        self.graph_counts[0].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "CUDA graph capture failed: decode steps launch kernels directly");
                        st.graphs_ok = false;
                    }
                }
            }
            match st.graphs.get(&key) {
                Some(g) => {
                    g.launch().map_err(drv)?;
                    self.graph_counts[1].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                None => self.enqueue(st, &plan)?,
            }
        } else {
            self.enqueue(st, &plan)?;
        }
        if r == 0 {
            self.gpu.sync()?;
            return Ok(vec![Vec::new(); ns]);
        }
        let vocab = c.vocab_size;
        let all = self.gpu.dtoh(&st.logits, r * vocab)?;
        Ok(crate::model::split_logits(&all, &counts, vocab))
    }

    fn capture(&self, st: &StepBuffers, plan: &StepPlan) -> Result<cudarc::driver::CudaGraph, GpuError> {
        use cudarc::driver::sys;
        let stream = self.gpu.stream();
        stream
            .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(drv)?;
        let enq = self.enqueue(st, plan);
        let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0)).map_err(drv);
        enq?;
        graph?.ok_or_else(|| GpuError::Driver("empty CUDA graph".into()))
    }

    fn alloc_step(&self, cap: Capacity) -> Result<StepBuffers, GpuError> {
        let c = &self.cfg;
        let layout = BlobLayout::new(&cap);
        Ok(StepBuffers {
            scratch: self.alloc_scratch(cap.t, cap.work)?,
            blob: self.gpu.alloc::<u8>(layout.total)?,
            sel: self.gpu.alloc::<f32>(cap.r.max(1) * c.hidden)?,
            logits: self.gpu.alloc::<f32>(cap.r.max(1) * c.vocab_size)?,
            layout,
            cap,
            graphs: std::collections::HashMap::new(),
            graphs_ok: std::env::var_os("PMKVQ_NO_CUDA_GRAPHS").is_none(),
        })
    }

    /// Every launch of one step, in order, reading the tables at their fixed places in the blob.
    fn enqueue(&self, st: &StepBuffers, p: &StepPlan) -> Result<(), GpuError> {
        let c = &self.cfg;
        let gpu = &self.gpu;
        let (h, qh, kvh, d) = (c.hidden, c.heads, c.kv_heads, c.head_dim);
        let (qd, kd) = (qh * d, kvh * d);
        let t = p.t;
        let sc = &st.scratch;
        let pf = |b: &CudaSlice<f32>| gpu.ptr(b);
        let (x, hn, q, k, v, attn) = (pf(&sc.x), pf(&sc.hn), pf(&sc.q), pf(&sc.k), pf(&sc.v), pf(&sc.attn));
        let (gate, upb, act, work) = (pf(&sc.gate), pf(&sc.up), pf(&sc.act), pf(&sc.work));
        let q8 = |f: u64| Act {
            f,
            qs: gpu.ptr(&sc.qs),
            qd: gpu.ptr(&sc.qd),
            qsum: gpu.ptr(&sc.qsum),
        };
        let base = gpu.ptr(&st.blob);
        let at = |off: usize| base + off as u64;
        let l = &st.layout;
        // embeddings
        let (emb, cols, tokp) = (gpu.ptr(&self.embed.w), self.embed.cols as i32, at(l.tokens));
        self.launch(
            "embed",
            &gpu.fwd.embed,
            cfg1((t as u32, 1, 1), 256),
            &[&emb, &self.embed.fmt, &cols, &tokp, &x],
        )?;
        self.dump(&sc.x, t * h)?;
        let (segp, rsp, rfp, r0p) = (at(l.segs), at(l.row_seq), at(l.row_fresh), at(l.row_fresh0));
        let (cosp, sinp) = (at(l.cos), at(l.sin));
        let sm = 1.0f32 / (d as f32).sqrt();
        let (qhi, kvhi, di, chi, spi) = (qh as i32, kvh as i32, d as i32, p.chunk as i32, p.splits as i32);
        let gqai = p.gqa as i32;
        let resid = OutArg {
            ptr: [x, 0, 0],
            ld: [h as i32, 0, 0],
            start: [0, h as i32, 0, 0],
            parts: 1,
            accumulate: 1,
        };
        let (rot_block, rot_scale) = self.rotation();
        for (li, layer) in self.layers.iter().enumerate() {
            // a decode-sized step's matmuls on block weights make their own 8-bit blocks from the residual (the
            // norm) or from gate and up (SwiGLU): one launch instead of two
            let own = p.fused && t <= TOKEN_TILE;
            let normed = |w: &CudaSlice<f32>, proj: &DevProj| -> Result<Source, GpuError> {
                if own && proj.own_blocks() {
                    return Ok(Source::Own {
                        mode: 0,
                        x,
                        aux: gpu.ptr(w),
                    });
                }
                self.norm(x, w, t, h, q8(hn))?;
                Ok(Source::Q8(q8(hn)))
            };
            let input = normed(&layer.attn_norm, &layer.qkv)?;
            self.project(&layer.qkv, input, t, &[(q, qd), (k, kd), (v, kd)], false)?;
            let seqp = at(l.seqs + li * p.ns * std::mem::size_of::<SeqArg>());
            let rseq = if p.rotate { seqp } else { 0 };
            // RoPE, the rotation of rotated sequences and the store of the new K and V: one launch
            let dstp = at(l.dsts + li * t * std::mem::size_of::<DstArg>());
            if p.fused {
                self.qkv_post([q, k, v], t, [cosp, sinp], [rseq, rsp], dstp, p.g_min)?;
            } else {
                self.rope(q, k, t, cosp, sinp)?;
                if p.rotate {
                    self.rotate(seqp, rsp, [q, k, v], t, false)?;
                }
            }
            self.launch(
                "attention",
                &gpu.fwd.attention,
                cfg1((attention_blocks(qh, kvh, p.gqa) as u32, t as u32, p.splits as u32), 32),
                &[
                    &segp, &seqp, &rsp, &rfp, &r0p, &q, &k, &v, &qhi, &kvhi, &di, &sm, &chi, &gqai, &work,
                ],
            )?;
            // the combine also undoes the rotation and writes the output projection's 8-bit blocks (when a head
            // holds whole blocks): two launches fewer per layer
            let quantize = layer.o.fmt >= 2;
            let fused8 = p.fused && quantize && d.is_multiple_of(32);
            let cseq = if p.fused { rseq } else { 0 };
            let a8 = q8(attn);
            let (qsp, qdp, qsump) = if fused8 { (a8.qs, a8.qd, a8.qsum) } else { (0, 0, 0) };
            self.launch(
                "attn_combine",
                &gpu.fwd.attn_combine,
                cfg1((qh as u32, t as u32, 1), COMBINE_THREADS),
                &[
                    &work, &spi, &di, &cseq, &rsp, &rot_block, &rot_scale, &attn, &qsp, &qdp, &qsump,
                ],
            )?;
            if !p.fused {
                if p.rotate {
                    self.rotate(seqp, rsp, [attn, 0, 0], t, true)?;
                }
                gpu.launch_kv_store(dstp, k, v, t, kd, p.g_min)?;
                self.mark("kv_store")?;
            }
            if quantize && !fused8 {
                self.quant8(attn, t * qd, a8)?;
            }
            self.matmul(&layer.o, Source::Q8(a8), t, resid)?;
            if li == 0 {
                self.dump(&sc.x, t * h)?;
            }
            let input = normed(&layer.ffn_norm, &layer.gate_up)?;
            self.project(&layer.gate_up, input, t, &[(gate, self.ffn), (upb, self.ffn)], false)?;
            let input = if own && layer.down.own_blocks() {
                Source::Own {
                    mode: 1,
                    x: gate,
                    aux: upb,
                }
            } else {
                let (n, a) = ((t * self.ffn) as i32, q8(act));
                self.launch(
                    "swiglu",
                    &gpu.fwd.swiglu,
                    cfg1(((t * self.ffn).div_ceil(256) as u32, 1, 1), 256),
                    &[&gate, &upb, &n, &a.f, &a.qs, &a.qd, &a.qsum],
                )?;
                Source::Q8(a)
            };
            self.matmul(&layer.down, input, t, resid)?;
            self.dump(&sc.x, t * h)?;
        }
        if p.r == 0 {
            return Ok(());
        }
        // logits for the rows the mode asks for
        let (rp, selp, hi) = (at(l.rows), gpu.ptr(&st.sel), h as i32);
        self.launch(
            "gather",
            &gpu.fwd.gather,
            cfg1((p.r as u32, 1, 1), 128),
            &[&x, &rp, &hi, &selp],
        )?;
        // `hn` and the 8-bit buffers hold t ≥ r rows
        self.norm(selp, &self.norm, p.r, h, q8(hn))?;
        let head = self.head.as_ref().unwrap_or(&self.embed);
        let vocab = c.vocab_size;
        let out = OutArg {
            ptr: [gpu.ptr(&st.logits), 0, 0],
            ld: [vocab as i32, 0, 0],
            start: [0, vocab as i32, 0, 0],
            parts: 1,
            accumulate: 0,
        };
        self.matmul(head, Source::Q8(q8(hn)), p.r, out)
    }
}

/// A kernel argument pushed by reference (the builder keeps references until launch).
trait ArgRef {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>);
}
impl<T: cudarc::driver::DeviceRepr> ArgRef for T {
    fn push<'a>(&'a self, b: &mut cudarc::driver::LaunchArgs<'a>) {
        b.arg(self);
    }
}

impl Backend for GpuModel {
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
    fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn KvStore],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let t = crate::model::check_batch(seqs, kv.len(), self.cfg.vocab_size)?;
        if t == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let mut stores = Vec::with_capacity(kv.len());
        for s in kv.iter_mut() {
            let m = s.method();
            match s.as_any_mut().and_then(|a| a.downcast_mut::<DeviceStore>()) {
                Some(d) => stores.push(d),
                None => {
                    return Err(ModelError::Input(format!(
                        "the `{m}` cache lives in host memory; the GPU forward pass needs a device cache"
                    )))
                }
            }
        }
        self.forward_device(seqs, &mut stores, mode, t)
    }

    fn new_store(&self, spec: &MethodSpec, geom: KvGeometry, max_tokens: usize) -> Result<Box<dyn KvStore>, KvError> {
        Ok(Box::new(DeviceStore::new(self.gpu.clone(), spec, geom, max_tokens)?))
    }

    fn device(&self) -> String {
        format!("cuda ({}, {})", self.gpu.name(), self.gpu.arch())
    }

    fn device_weight_bytes(&self) -> usize {
        self.weight_bytes
    }

    fn kv_extensions(&self) -> crate::kvcache::KvExtensions {
        crate::kvcache::KvExtensions {
            rotation: true,
            fitted_floor: true,
            planning: false,
        }
    }
}
