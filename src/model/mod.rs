//! Model weights, the Llama/Qwen2/Qwen3/Gemma 3 forward pass, tokenizer and chat template.
//!
//! Owns: loading GGUF (v2/v3) and HF safetensors checkpoints into [`Model`], the forward pass given a KV store,
//! the tokenizer and the chat template. Does not own: KV state (the caller passes a [`crate::kvcache::KvStore`]
//! per sequence), sequences, sampling or budgets.
//! Invariants: a loaded model's tensors all have the shapes its [`ModelConfig`] implies (checked at load); the
//! forward pass never panics on bad input — token ids and positions are checked and reported as errors.

pub mod chat;
pub mod config;
mod forward;
mod gguf;
pub mod linear;
mod safetensors;
pub mod tokenizer;

pub use config::{Arch, ModelConfig, RopeLayout};
pub use forward::{check_batch, logit_rows, split_logits, LogitsMode, SeqInput, NORM_ULP_PROBE};
pub use tokenizer::Tokenizer;

use crate::kvcache::KvError;
use linear::Linear;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{file}: {source}")]
    Io { file: PathBuf, source: std::io::Error },
    #[error("{file}: {what}")]
    Format { file: PathBuf, what: String },
    #[error(
        "{file}: unsupported architecture `{arch}` (supported: GGUF llama, qwen2, qwen3, gemma3; safetensors LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"
    )]
    UnsupportedArch { file: PathBuf, arch: String },
    #[error("{file}: tensor `{tensor}` has unsupported type {dtype}")]
    UnsupportedDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{file}: missing tensor `{name}`")]
    MissingTensor { file: PathBuf, name: String },
    #[error("{file}: tensor `{tensor}` has shape {got:?}, expected {expected:?}")]
    BadShape {
        file: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error("kv cache: {0}")]
    Kv(#[from] KvError),
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    #[error("thread pool: {0}")]
    ThreadPool(String),
    /// An error that belongs to one sequence of a batched forward pass (its input, or its cache): the caller
    /// ends that sequence and keeps the others, after taking the failed step back out of their caches (see
    /// [`Backend::forward`]).
    #[error("sequence {index} of the batch: {source}")]
    InSequence { index: usize, source: Box<ModelError> },
}

impl ModelError {
    /// `e`, attributed to sequence `index` of the batch.
    pub fn in_sequence(index: usize, e: impl Into<ModelError>) -> ModelError {
        ModelError::InSequence {
            index,
            source: Box::new(e.into()),
        }
    }

    /// The error without its sequence (for callers that run one sequence at a time).
    pub fn unattributed(self) -> ModelError {
        match self {
            ModelError::InSequence { source, .. } => source.unattributed(),
            e => e,
        }
    }
}

/// The message of a caught panic.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Runtime options that do not change the model's numerics.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Worker threads for matmuls and attention (0 = one per available core).
    pub threads: usize,
}

/// Where the forward pass runs: the CPU ([`Model`] itself) or a GPU (`gpu::GpuModel`, which holds the same
/// weights in device memory). Both take the same inputs; each makes the KV stores its forward pass reads (host
/// stores for the CPU, device stores for the GPU), so callers never pick a store type themselves.
pub trait Backend: Send + Sync {
    fn config(&self) -> &ModelConfig;
    /// One batched step. An error that belongs to one sequence comes as [`ModelError::InSequence`]; then the
    /// other sequences' caches may hold part of the step (some layers), which `KvStore::truncate` to their
    /// length before the call takes back.
    fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn crate::kvcache::KvStore],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
    fn new_store(
        &self,
        spec: &crate::kvcache::MethodSpec,
        geom: crate::kvcache::KvGeometry,
        max_tokens: usize,
    ) -> Result<Box<dyn crate::kvcache::KvStore>, KvError>;
    /// `cpu` or the GPU's name and architecture.
    fn device(&self) -> String;
    /// Prefill (or teacher-force) one sequence in chunks of at most `chunk` tokens, continuing from what `kv`
    /// holds. Returns logits per `mode` (for `Last`, of the final token only).
    fn forward_chunked(
        &self,
        tokens: &[u32],
        kv: &mut dyn crate::kvcache::KvStore,
        chunk: usize,
        mode: LogitsMode,
    ) -> Result<Vec<f32>, ModelError> {
        let chunk = chunk.max(1);
        let mut all = Vec::new();
        let mut pos0 = kv.len(0) as u32;
        let n_chunks = tokens.len().div_ceil(chunk);
        for (ci, c) in tokens.chunks(chunk).enumerate() {
            let positions: Vec<u32> = (pos0..pos0 + c.len() as u32).collect();
            let m = match mode {
                LogitsMode::All => LogitsMode::All,
                LogitsMode::Last if ci + 1 == n_chunks => LogitsMode::Last,
                _ => LogitsMode::None,
            };
            all.append(&mut self.forward_one(c, &positions, kv, m)?);
            pos0 += c.len() as u32;
        }
        Ok(all)
    }
    /// One sequence's step (`positions` as in [`SeqInput`]): its logits rows as `mode` asks, its errors as they
    /// are (not attributed to a place in a batch).
    fn forward_one(
        &self,
        tokens: &[u32],
        positions: &[u32],
        kv: &mut dyn crate::kvcache::KvStore,
        mode: LogitsMode,
    ) -> Result<Vec<f32>, ModelError> {
        let mut out = self
            .forward(&[SeqInput { tokens, positions }], &mut [kv], mode)
            .map_err(ModelError::unattributed)?;
        Ok(out.pop().unwrap_or_default())
    }
    /// What this backend's caches take beyond the paper's method (the host stores: everything; the device
    /// store: the rotation and the fitted floor, not the planned widths, so a GPU runs PM-KVQ by shares).
    fn kv_extensions(&self) -> crate::kvcache::KvExtensions {
        crate::kvcache::KvExtensions::ALL
    }
    /// Bytes of weights held in device memory (0 on the CPU).
    fn device_weight_bytes(&self) -> usize {
        0
    }
    fn kv_geometry(&self) -> crate::kvcache::KvGeometry {
        let c = self.config();
        crate::kvcache::KvGeometry {
            layers: c.layers,
            q_heads: c.heads,
            kv_heads: c.kv_heads,
            head_dim: c.head_dim,
        }
    }
}

impl Backend for Model {
    fn config(&self) -> &ModelConfig {
        &self.config
    }
    fn forward(
        &self,
        seqs: &[SeqInput<'_>],
        kv: &mut [&mut dyn crate::kvcache::KvStore],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        Model::forward(self, seqs, kv, mode)
    }
    fn new_store(
        &self,
        spec: &crate::kvcache::MethodSpec,
        geom: crate::kvcache::KvGeometry,
        max_tokens: usize,
    ) -> Result<Box<dyn crate::kvcache::KvStore>, KvError> {
        spec.new_store_in(geom, self.config.windowing().as_ref(), max_tokens)
    }
    fn device(&self) -> String {
        "cpu".into()
    }
}

pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    /// Qwen3: RMSNorm weights (head_dim) applied to every head of q and of k before RoPE.
    pub qk_norm: Option<(Vec<f32>, Vec<f32>)>,
    /// q, k and v stacked when they share a storage type (one pass over the input), else separate.
    pub qkv: Projection,
    pub o: Linear,
    pub ffn_norm: Vec<f32>,
    pub gate_up: Projection,
    pub down: Linear,
    /// Gemma: RMSNorm of the attention and of the MLP output before each residual add.
    pub post_norms: Option<(Vec<f32>, Vec<f32>)>,
}

/// Matrices applied to the same input.
pub(crate) enum Projection {
    Fused { linear: Linear, splits: Vec<usize> },
    Split(Vec<Linear>),
}

impl Projection {
    /// Stack `parts` when they share a storage type, then lay them out for this CPU's kernels.
    pub fn new(parts: Vec<Linear>) -> Self {
        let splits = parts.iter().map(|p| p.rows).collect();
        match Linear::concat_rows(parts) {
            Ok(linear) => Projection::Fused {
                linear: lay_out(linear),
                splits,
            },
            Err(parts) => Projection::Split(parts.into_iter().map(lay_out).collect()),
        }
    }

    /// Outputs of each part, each `t × rows_i`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<Vec<f32>>, ModelError> {
        match self {
            Projection::Split(parts) => parts.iter().map(|p| p.forward(x, t)).collect(),
            Projection::Fused { linear, splits } => {
                let all = linear.forward(x, t)?;
                let mut outs: Vec<Vec<f32>> = splits.iter().map(|&r| Vec::with_capacity(r * t)).collect();
                for row in all.chunks_exact(linear.rows) {
                    let mut off = 0;
                    for (o, &r) in outs.iter_mut().zip(splits) {
                        o.extend_from_slice(&row[off..off + r]);
                        off += r;
                    }
                }
                Ok(outs)
            }
        }
    }

    fn weight_bytes(&self) -> usize {
        match self {
            Projection::Fused { linear, .. } => linear.weight_bytes(),
            Projection::Split(p) => p.iter().map(Linear::weight_bytes).sum(),
        }
    }
}

pub struct Model {
    pub config: ModelConfig,
    /// The file or directory the model came from.
    pub source: PathBuf,
    pub(crate) embed: Linear,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Vec<f32>,
    /// `None` when the output projection is tied to the embeddings.
    pub(crate) lm_head: Option<Linear>,
    /// llama3 frequency factors per rotary pair (all 1 without scaling).
    pub(crate) rope_factors: Vec<f32>,
    pool: rayon::ThreadPool,
}

impl Model {
    /// Load a `.gguf` file or an HF directory (config.json + *.safetensors); returns the model and its tokenizer.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<(Model, Tokenizer), ModelError> {
        let (mut parts, tok) = if path.is_dir() {
            safetensors::load(path)?
        } else {
            gguf::load(path)?
        };
        // Every id the tokenizer can produce must have an embedding row (and a logit): a tokenizer larger than
        // the model's vocabulary (a hostile tokenizer.json, or GGUF metadata `vocab_size` below its token list)
        // would fail whichever batch such a token reached.
        if tok.vocab_size() > parts.config.vocab_size {
            return Err(ModelError::Format {
                file: path.to_path_buf(),
                what: format!(
                    "the tokenizer has {} tokens, beyond the vocabulary of the model's embedding ({} rows)",
                    tok.vocab_size(),
                    parts.config.vocab_size
                ),
            });
        }
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.threads
        };
        parts.pool = Some(
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|i| format!("pmkvq-math-{i}"))
                .build()
                .map_err(|e| ModelError::ThreadPool(e.to_string()))?,
        );
        Ok((parts.finish(path)?, tok))
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Bytes of weights held in memory.
    pub fn weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| l.qkv.weight_bytes() + l.o.weight_bytes() + l.gate_up.weight_bytes() + l.down.weight_bytes())
            .sum();
        layers + self.embed.weight_bytes() + self.lm_head.as_ref().map_or(0, Linear::weight_bytes)
    }

    pub fn kv_geometry(&self) -> crate::kvcache::KvGeometry {
        crate::kvcache::KvGeometry {
            layers: self.config.layers,
            q_heads: self.config.heads,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Run `f` on `store` (a measurement store over every layer, made outside [`Backend::new_store`]) with this
    /// model's sliding windows in front of it where it has them; its local layers then stay unused.
    pub fn with_windows<R>(
        &self,
        store: &mut dyn crate::kvcache::KvStore,
        max_tokens: usize,
        f: impl FnOnce(&mut dyn crate::kvcache::KvStore) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        match self.config.windowing() {
            None => f(store),
            Some(w) => {
                let mut windowed = crate::kvcache::Windowed::new(store, self.kv_geometry(), w, max_tokens)?;
                f(&mut windowed)
            }
        }
    }

    pub(crate) fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

/// What a loader produces before the model is assembled.
pub(crate) struct ModelParts {
    pub config: ModelConfig,
    pub embed: Linear,
    pub layers: Vec<Layer>,
    pub norm: Vec<f32>,
    pub lm_head: Option<Linear>,
    pub pool: Option<rayon::ThreadPool>,
}

impl ModelParts {
    fn finish(self, path: &Path) -> Result<Model, ModelError> {
        let rope_factors = self.config.rope.freq_factors();
        Ok(Model {
            config: self.config,
            source: path.to_path_buf(),
            embed: self.embed,
            layers: self.layers,
            norm: self.norm,
            lm_head: self.lm_head,
            rope_factors,
            pool: self.pool.ok_or_else(|| ModelError::ThreadPool("no pool".into()))?,
        })
    }
}

/// The role of each tensor; each loader maps roles to its own tensor names.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Role {
    Embed,
    Output,
    OutputNorm,
    AttnNorm(usize),
    Q(usize),
    K(usize),
    V(usize),
    O(usize),
    QBias(usize),
    KBias(usize),
    VBias(usize),
    QNorm(usize),
    KNorm(usize),
    PostAttnNorm(usize),
    FfnNorm(usize),
    PostFfnNorm(usize),
    Gate(usize),
    Up(usize),
    Down(usize),
}

/// A source of named tensors (a GGUF file, a safetensors directory).
pub(crate) trait WeightSource {
    fn name(&self, role: Role) -> String;
    fn has(&self, role: Role) -> bool;
    /// A `rows × cols` matrix.
    fn matrix(&self, role: Role, rows: usize, cols: usize) -> Result<Linear, ModelError>;
    /// A vector of `len` values as f32.
    fn vector(&self, role: Role, len: usize) -> Result<Vec<f32>, ModelError>;
}

/// A matrix in the layout this CPU's matmul kernels read (panels where a panel kernel exists), decided once
/// for every matrix here, after stacking.
fn lay_out(l: Linear) -> Linear {
    l.for_kernels(crate::cpu::kernels())
}

/// Build every layer from a source, checking each shape against the config.
pub(crate) fn build_parts(cfg: ModelConfig, src: &dyn WeightSource) -> Result<ModelParts, ModelError> {
    let (h, qd, kd, f) = (cfg.hidden, cfg.heads * cfg.head_dim, cfg.kv_dim(), cfg.ffn);
    let with_bias = |mut lin: Linear, role: Role| -> Result<Linear, ModelError> {
        if src.has(role) {
            lin.bias = Some(src.vector(role, lin.rows)?);
        }
        Ok(lin)
    };
    // grown as tensors are found: a hostile `block_count` must not size an allocation
    let mut layers = Vec::new();
    for l in 0..cfg.layers {
        let q = with_bias(src.matrix(Role::Q(l), qd, h)?, Role::QBias(l))?;
        let k = with_bias(src.matrix(Role::K(l), kd, h)?, Role::KBias(l))?;
        let v = with_bias(src.matrix(Role::V(l), kd, h)?, Role::VBias(l))?;
        let qk_norm = if cfg.arch.qk_norm() {
            Some((
                src.vector(Role::QNorm(l), cfg.head_dim)?,
                src.vector(Role::KNorm(l), cfg.head_dim)?,
            ))
        } else {
            None
        };
        let post_norms = if cfg.arch.post_norms() {
            Some((
                src.vector(Role::PostAttnNorm(l), h)?,
                src.vector(Role::PostFfnNorm(l), h)?,
            ))
        } else {
            None
        };
        layers.push(Layer {
            post_norms,
            attn_norm: src.vector(Role::AttnNorm(l), h)?,
            qk_norm,
            qkv: Projection::new(vec![q, k, v]),
            o: lay_out(src.matrix(Role::O(l), h, qd)?),
            ffn_norm: src.vector(Role::FfnNorm(l), h)?,
            gate_up: Projection::new(vec![src.matrix(Role::Gate(l), f, h)?, src.matrix(Role::Up(l), f, h)?]),
            down: lay_out(src.matrix(Role::Down(l), h, f)?),
        });
    }
    let embed = lay_out(src.matrix(Role::Embed, cfg.vocab_size, h)?);
    let lm_head = if src.has(Role::Output) && !cfg.tie_embeddings {
        Some(lay_out(src.matrix(Role::Output, cfg.vocab_size, h)?))
    } else {
        None
    };
    let norm = src.vector(Role::OutputNorm, h)?;
    Ok(ModelParts {
        config: cfg,
        embed,
        layers,
        norm,
        lm_head,
        pool: None,
    })
}
