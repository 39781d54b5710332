//! pmkvq: an LLM inference engine for edge devices whose KV cache follows a memory budget with PM-KVQ,
//! progressive mixed-precision KV-cache quantization.
//!
//! # Layout
//! - [`model`]: GGUF/safetensors loading, the Llama/Qwen2 forward pass (KV kept outside the model), tokenizer,
//!   chat template, and the SIMD matmul kernels.
//! - [`kvcache`]: KV stores and attention over them (the reference f16 store; PM-KVQ's packed store).
//! - [`calib`]: offline calibration (per-layer bit allocation).
//! - [`engine`]: sampling, stop criteria, incremental detokenization and the generation loop.
//! - [`eval`]: the quality harness (divergence from the f16 cache at equal memory).
//! - [`fetch`]: the default model, fetched from the package registry and checked.
//!
//! # Data flow (one sequence)
//! text → `Tokenizer::encode` → `Model::forward(tokens, positions, &mut dyn KvStore)` per chunk → logits →
//! `engine::Sampler` → token → `engine::Detokenizer` (whole UTF-8 characters only) → stop checks → output.

pub mod app;
pub mod calib;
pub mod config;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod kvcache;
pub mod model;
pub mod server;
