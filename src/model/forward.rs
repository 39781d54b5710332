//! The decoder forward pass over a batch of sequences, each with its own KV store.

use super::config::RopeLayout;
use super::linear::{Linear, WeightData};
use super::{Model, ModelError};
use crate::cpu::{dequantize_row, QK};
use crate::kvcache::KvStore;
use rayon::prelude::*;

/// One sequence's new tokens in a batched forward pass.
#[derive(Clone, Copy, Debug)]
pub struct SeqInput<'a> {
    pub tokens: &'a [u32],
    /// Position id of each token (normally `stored..stored+n`; calibration passes scaled ids).
    pub positions: &'a [u32],
}

/// Which rows get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsMode {
    /// Only each sequence's last token (generation).
    Last,
    /// Every token (teacher-forced evaluation).
    All,
    /// None (prefill chunks before the last).
    None,
}

/// Diagnostics only: while set, every RMSNorm scale is multiplied by 1 + 1e-7 (about one ulp). Measures how far a
/// last-bit difference moves this model's outputs — the yardstick for CPU-vs-GPU agreement, since two correct
/// implementations that sum in a different order differ by that much (`examples/gpu_check.rs`,
/// `examples/sensitivity.rs`). Never set by the daemon or the CLI.
#[doc(hidden)]
pub static NORM_ULP_PROBE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Check one sequence's input against a vocabulary of `vocab` ids (every backend runs this before any layer).
pub fn check_input(s: &SeqInput<'_>, vocab: usize) -> Result<(), ModelError> {
    if s.tokens.len() != s.positions.len() {
        return Err(ModelError::Input("tokens and positions differ in length".into()));
    }
    if let Some(&bad) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ModelError::Input(format!(
            "token id {bad} out of range (vocab size {vocab})"
        )));
    }
    Ok(())
}

/// A batch's inputs checked (one store per sequence, every sequence's tokens): the total tokens.
pub fn check_batch(seqs: &[SeqInput<'_>], stores: usize, vocab: usize) -> Result<usize, ModelError> {
    if seqs.len() != stores {
        return Err(ModelError::Input(format!(
            "{} sequences but {stores} kv stores",
            seqs.len()
        )));
    }
    for (i, s) in seqs.iter().enumerate() {
        check_input(s, vocab).map_err(|e| ModelError::in_sequence(i, e))?;
    }
    Ok(seqs.iter().map(|s| s.tokens.len()).sum())
}

/// Which rows of a batch get logits under `mode` (indices into all sequences' rows), and how many per sequence.
pub fn logit_rows(seqs: &[SeqInput<'_>], mode: LogitsMode) -> (Vec<usize>, Vec<usize>) {
    let mut rows = Vec::new();
    let mut counts = Vec::with_capacity(seqs.len());
    let mut start = 0;
    for s in seqs {
        let n = s.tokens.len();
        let before = rows.len();
        match mode {
            LogitsMode::All => rows.extend(start..start + n),
            LogitsMode::Last if n > 0 => rows.push(start + n - 1),
            _ => {}
        }
        counts.push(rows.len() - before);
        start += n;
    }
    (rows, counts)
}

/// Split `rows × vocab` logits into each sequence's rows (`counts` from [`logit_rows`]).
pub fn split_logits(all: &[f32], counts: &[usize], vocab: usize) -> Vec<Vec<f32>> {
    let mut off = 0;
    counts
        .iter()
        .map(|&c| {
            let v = all[off * vocab..(off + c) * vocab].to_vec();
            off += c;
            v
        })
        .collect()
}

/// RMSNorm over every head (`w.len()` values) of `x` in place (Qwen3's q/k norm, as ggml's rms_norm per row),
/// through the caller's scratch buffer (no allocation in the decode step).
fn head_norm(x: &mut [f32], w: &[f32], eps: f32, scratch: &mut Vec<f32>) {
    rms_norm(x, w, eps, scratch);
    x.copy_from_slice(scratch);
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.clear();
    let dim = w.len();
    for row in x.chunks_exact(dim) {
        // Sum of squares in f64, as ggml's rms_norm does: the activations feed 8-bit quantization, where
        // a last-bit difference can flip a code.
        let ms = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / dim as f64) as f32;
        let mut inv = 1.0 / (ms + eps).sqrt();
        if NORM_ULP_PROBE.load(std::sync::atomic::Ordering::Relaxed) {
            inv *= 1.000_000_1;
        }
        out.extend(row.iter().zip(w).map(|(v, g)| v * inv * g));
    }
}

/// GELU, tanh approximation (ggml's `gelu`, HF `gelu_pytorch_tanh`).
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (1.0 + 0.044_715 * x * x)).tanh())
}

/// cos/sin tables of a batch's positions: the global layers' RoPE and, where layers slide, the local layers'.
struct RopeTables {
    global: (Vec<f32>, Vec<f32>),
    local: Option<(Vec<f32>, Vec<f32>)>,
}

impl Linear {
    /// Row `r` as f32 (embedding lookup).
    fn row_f32(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        match &self.data {
            WeightData::Blocks { format, bytes } => {
                let rb = self.cols / QK * format.block_bytes();
                dequantize_row(*format, &bytes[r * rb..(r + 1) * rb], out);
            }
            WeightData::Panels { format, bytes } => {
                let mut row = vec![0u8; self.cols / QK * format.block_bytes()];
                crate::cpu::panel::gguf_row(*format, self.rows, bytes, r, &mut row);
                dequantize_row(*format, &row, out);
            }
            WeightData::F32(w) => out.copy_from_slice(&w[r * self.cols..(r + 1) * self.cols]),
            WeightData::F16(w) => {
                for (o, v) in out.iter_mut().zip(&w[r * self.cols..(r + 1) * self.cols]) {
                    *o = v.to_f32();
                }
            }
            WeightData::Candle(_) => {
                return Err(ModelError::Input(
                    "embedding rows of candle-only weight types are dequantized at load".into(),
                ))
            }
        }
        Ok(())
    }
}

impl Model {
    /// Apply RoPE in place to `x` (`t × heads × d`) given one angle table row per token.
    fn rope(&self, x: &mut [f32], heads: usize, cos: &[f32], sin: &[f32]) {
        let d = self.config.head_dim;
        let half = d / 2;
        for (ti, tok) in x.chunks_exact_mut(heads * d).enumerate() {
            let (c, s) = (&cos[ti * half..(ti + 1) * half], &sin[ti * half..(ti + 1) * half]);
            for head in tok.chunks_exact_mut(d) {
                match self.config.rope.layout {
                    RopeLayout::Interleaved => {
                        for j in 0..half {
                            let (a, b) = (head[2 * j], head[2 * j + 1]);
                            head[2 * j] = a * c[j] - b * s[j];
                            head[2 * j + 1] = a * s[j] + b * c[j];
                        }
                    }
                    RopeLayout::Neox => {
                        for j in 0..half {
                            let (a, b) = (head[j], head[j + half]);
                            head[j] = a * c[j] - b * s[j];
                            head[j + half] = a * s[j] + b * c[j];
                        }
                    }
                }
            }
        }
    }

    /// Run the new tokens of every sequence through the model, attending over (and appending to) each
    /// sequence's KV store. Returns, per sequence, its logits rows as `mode` asks (`rows × vocab`).
    pub fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn KvStore],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let t_total = check_batch(seqs, kv.len(), self.config.vocab_size)?;
        if t_total == 0 {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        // Every store confirms it can take its tokens in every layer before any layer is touched.
        for (i, (s, store)) in seqs.iter().zip(kv.iter_mut()).enumerate() {
            self.check_store(&**store).map_err(|e| ModelError::in_sequence(i, e))?;
            store
                .reserve(s.tokens.len())
                .map_err(|e| ModelError::in_sequence(i, e))?;
        }
        self.install(|| self.forward_inner(seqs, kv, mode, t_total))
    }

    fn forward_inner(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn KvStore],
        mode: LogitsMode,
        t: usize,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let h = cfg.hidden;
        let tokens: Vec<u32> = seqs.iter().flat_map(|s| s.tokens).copied().collect();
        let mut x = self.embed_rows(&tokens)?;
        let rope = self.angle_tables(seqs.iter().flat_map(|s| s.positions), t);
        for li in 0..self.layers.len() {
            self.run_layer(li, &mut x, t, &rope, seqs, kv, false)?;
        }
        let (rows, counts) = logit_rows(seqs, mode);
        if rows.is_empty() {
            return Ok(vec![Vec::new(); seqs.len()]);
        }
        let mut sel = Vec::with_capacity(rows.len() * h);
        for &r in &rows {
            sel.extend_from_slice(&x[r * h..(r + 1) * h]);
        }
        let mut hbuf = Vec::with_capacity(sel.len());
        rms_norm(&sel, &self.norm, cfg.rms_eps, &mut hbuf);
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = head.forward(&hbuf, rows.len())?;
        Ok(split_logits(&logits, &counts, cfg.vocab_size))
    }

    fn angle_tables<'a>(&self, positions: impl Iterator<Item = &'a u32> + Clone, t: usize) -> RopeTables {
        let half = self.config.head_dim / 2;
        let table = |rope: &super::config::RopeConfig, factors: &[f32]| {
            let mut cos = Vec::with_capacity(t * half);
            let mut sin = Vec::with_capacity(t * half);
            for &p in positions.clone() {
                rope.angles(p as f32, factors, &mut cos, &mut sin);
            }
            (cos, sin)
        };
        RopeTables {
            global: table(&self.config.rope, &self.rope_factors),
            local: self
                .config
                .sliding
                .as_ref()
                .map(|s| table(&s.rope, &s.rope.freq_factors())),
        }
    }

    /// A store must attend over windows where this model's layers slide (and only then).
    fn check_store(&self, kv: &dyn KvStore) -> Result<(), ModelError> {
        let want = self.config.windowing();
        if kv.windowing() != want.as_ref() {
            return Err(ModelError::Input(format!(
                "the kv store's sliding windows ({:?}) are not this model's ({:?}): make stores through the model",
                kv.windowing().map(|w| w.window),
                want.map(|w| w.window)
            )));
        }
        Ok(())
    }

    /// One decoder layer over `x` (`t × hidden`, all sequences' rows) in place. With `attn_only`, returns the
    /// attention block's output (after the output projection, before the residual add) and leaves `x` as it was.
    #[allow(clippy::too_many_arguments)]
    fn run_layer(
        &self,
        li: usize,
        x: &mut [f32],
        t: usize,
        rope: &RopeTables,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn KvStore],
        attn_only: bool,
    ) -> Result<Option<Vec<f32>>, ModelError> {
        let cfg = &self.config;
        let (qd, kd) = (cfg.heads * cfg.head_dim, cfg.kv_dim());
        let layer = &self.layers[li];
        let mut hbuf = Vec::with_capacity(x.len());
        rms_norm(x, &layer.attn_norm, cfg.rms_eps, &mut hbuf);
        let mut qkv = layer.qkv.forward(&hbuf, t)?;
        let v = qkv.pop().unwrap_or_default();
        let mut k = qkv.pop().unwrap_or_default();
        let mut q = qkv.pop().unwrap_or_default();
        if let Some((qn, kn)) = &layer.qk_norm {
            // (hbuf, the normed input, is spent: the projections have read it)
            head_norm(&mut q, qn, cfg.rms_eps, &mut hbuf);
            head_norm(&mut k, kn, cfg.rms_eps, &mut hbuf);
        }
        let (cos, sin) = match &rope.local {
            Some(local) if cfg.is_local(li) => (&local.0, &local.1),
            _ => (&rope.global.0, &rope.global.1),
        };
        self.rope(&mut q, cfg.heads, cos, sin);
        self.rope(&mut k, cfg.kv_heads, cos, sin);
        if cfg.query_scale != 1.0 {
            q.iter_mut().for_each(|v| *v *= cfg.query_scale);
        }
        let mut attn = vec![0.0f32; t * qd];
        // Each sequence's attention over its own cache; sequences side by side on the pool (one fork-join for
        // the batch rather than one per sequence; a long one still splits its own work inside).
        let mut work = Vec::with_capacity(seqs.len());
        let (mut start, mut rest) = (0, attn.as_mut_slice());
        for (i, (s, store)) in seqs.iter().zip(kv.iter_mut()).enumerate() {
            let n = s.tokens.len();
            let (out, tail) = std::mem::take(&mut rest).split_at_mut(n * qd);
            rest = tail;
            work.push((i, store, start, n, out));
            start += n;
        }
        let attend = |(i, store, start, n, out): (usize, &mut &mut dyn KvStore, usize, usize, &mut [f32])| {
            let (q, k, v) = (
                &q[start * qd..(start + n) * qd],
                &k[start * kd..(start + n) * kd],
                &v[start * kd..(start + n) * kd],
            );
            store
                .attend_and_store(li, q, k, v, n, out)
                .map_err(|e| ModelError::in_sequence(i, e))
        };
        let done: Vec<Result<(), ModelError>> = if work.len() > 1 && rayon::current_num_threads() > 1 {
            work.into_par_iter().map(attend).collect()
        } else {
            work.into_iter().map(attend).collect()
        };
        // the first failing sequence in batch order, as a sequential loop would report it
        done.into_iter().collect::<Result<Vec<()>, _>>()?;
        let mut o = layer.o.forward(&attn, t)?;
        if let Some((post_attn, _)) = &layer.post_norms {
            rms_norm(&o, post_attn, cfg.rms_eps, &mut hbuf);
            std::mem::swap(&mut o, &mut hbuf);
        }
        if attn_only {
            return Ok(Some(o));
        }
        for (xv, ov) in x.iter_mut().zip(&o) {
            *xv += ov;
        }
        rms_norm(x, &layer.ffn_norm, cfg.rms_eps, &mut hbuf);
        let gu = layer.gate_up.forward(&hbuf, t)?;
        let mut act = gu[0].clone();
        if cfg.arch.gelu() {
            for (a, u) in act.iter_mut().zip(&gu[1]) {
                *a = gelu_tanh(*a) * u;
            }
        } else {
            for (a, u) in act.iter_mut().zip(&gu[1]) {
                *a = *a / (1.0 + (-*a).exp()) * u;
            }
        }
        let mut down = layer.down.forward(&act, t)?;
        if let Some((_, post_ffn)) = &layer.post_norms {
            rms_norm(&down, post_ffn, cfg.rms_eps, &mut hbuf);
            std::mem::swap(&mut down, &mut hbuf);
        }
        for (xv, dv) in x.iter_mut().zip(&down) {
            *xv += dv;
        }
        Ok(None)
    }

    /// Calibration: the hidden state entering every layer (`layers + 1` entries; the last enters the final
    /// norm) for one sequence, run through `kv`.
    pub fn layer_inputs(
        &self,
        tokens: &[u32],
        positions: &[u32],
        kv: &mut dyn KvStore,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let seqs = [SeqInput { tokens, positions }];
        check_input(&seqs[0], self.config.vocab_size)?;
        self.check_store(kv)?;
        let t = tokens.len();
        self.install(|| {
            let mut x = self.embed_rows(tokens)?;
            let rope = self.angle_tables(positions.iter(), t);
            let mut out = Vec::with_capacity(self.layers.len() + 1);
            for li in 0..self.layers.len() {
                out.push(x.clone());
                self.run_layer(li, &mut x, t, &rope, &seqs, &mut [&mut *kv], false)?;
            }
            out.push(x);
            Ok(out)
        })
    }

    /// Calibration: run layers `first..` on hidden state `x` (`t × hidden`) and return the logits of every row.
    pub fn forward_from(
        &self,
        first: usize,
        mut x: Vec<f32>,
        positions: &[u32],
        kv: &mut dyn KvStore,
    ) -> Result<Vec<f32>, ModelError> {
        let t = positions.len();
        let dummy = vec![0u32; t];
        let seqs = [SeqInput {
            tokens: &dummy,
            positions,
        }];
        self.check_store(kv)?;
        self.install(|| {
            let rope = self.angle_tables(positions.iter(), t);
            for li in first..self.layers.len() {
                self.run_layer(li, &mut x, t, &rope, &seqs, &mut [&mut *kv], false)?;
            }
            let mut hbuf = Vec::new();
            rms_norm(&x, &self.norm, self.config.rms_eps, &mut hbuf);
            self.lm_head.as_ref().unwrap_or(&self.embed).forward(&hbuf, t)
        })
    }

    /// Calibration: layer `li`'s attention block output for hidden input `x`, attending through `kv`.
    pub fn attention_block(
        &self,
        li: usize,
        x: &[f32],
        positions: &[u32],
        kv: &mut dyn KvStore,
    ) -> Result<Vec<f32>, ModelError> {
        let t = positions.len();
        let dummy = vec![0u32; t];
        let seqs = [SeqInput {
            tokens: &dummy,
            positions,
        }];
        let mut xm = x.to_vec();
        self.check_store(kv)?;
        self.install(|| {
            let rope = self.angle_tables(positions.iter(), t);
            Ok(self
                .run_layer(li, &mut xm, t, &rope, &seqs, &mut [&mut *kv], true)?
                .unwrap_or_default())
        })
    }

    fn embed_rows(&self, tokens: &[u32]) -> Result<Vec<f32>, ModelError> {
        let h = self.config.hidden;
        let mut x = vec![0.0f32; tokens.len() * h];
        for (row, &tok) in x.chunks_exact_mut(h).zip(tokens) {
            self.embed.row_f32(tok as usize, row)?;
        }
        if let Some(s) = self.config.embed_scale {
            x.iter_mut().for_each(|v| *v *= s);
        }
        Ok(x)
    }

    /// Prefill (or teacher-force) one sequence in chunks of at most `chunk` tokens, continuing from what `kv`
    /// holds ([`Backend::forward_chunked`](super::Backend::forward_chunked) on the CPU).
    pub fn forward_chunked(
        &self,
        tokens: &[u32],
        kv: &mut dyn KvStore,
        chunk: usize,
        mode: LogitsMode,
    ) -> Result<Vec<f32>, ModelError> {
        super::Backend::forward_chunked(self, tokens, kv, chunk, mode)
    }
}
