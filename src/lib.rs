//! pmkvq: an LLM inference engine for edge devices whose KV cache follows a memory budget with PM-KVQ,
//! progressive mixed-precision KV-cache quantization.
//!
//! # Layout
//! - [`app`]: the daemon's wiring (bind, health, load, serve, drain); `pmkvqd` and the tests both run it.
//! - [`config`]: the only reader of config files, `PMKVQ_*` variables and pmkvqd's argv; typed, validated.
//! - [`server`]: the gRPC front end (`pmkvq.v1`, health, reflection); wire ⇄ engine conversion.
//! - [`engine`]: the engine thread (continuous batching over sequences, each with its own KV cache), request
//!   validation, sampling, stop criteria, incremental detokenization; the single-sequence generation loop.
//! - [`model`]: GGUF/safetensors loading, the Llama/Qwen2 forward pass (KV kept outside the model), tokenizer,
//!   chat template, and the SIMD matmul kernels.
//! - [`kvcache`]: KV stores and attention over them (the reference f16 store; PM-KVQ's packed store).
//! - [`calib`]: offline calibration (per-layer bit allocation, key reparameterization).
//! - [`eval`]: the quality harness (divergence from the f16 cache at equal memory).
//! - [`fetch`]: the default model, fetched from the package registry and checked.
//!
//! # Data flow (daemon)
//! client ─Generate─▶ `server` (validate wire values) → `EngineHandle::submit` (tokenize, check bounds) ──▶ bounded
//! command channel ──▶ engine thread: each step admits waiting requests, drops cancelled ones (freeing their KV),
//! runs one batched `Model::forward` over every running sequence's `KvStore`, samples, detokenizes, checks stops
//! ──▶ bounded per-stream event channel (full: that sequence pauses) ──▶ response stream.

pub mod app;
pub mod calib;
pub mod config;
pub mod doctor;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod gpu;
pub mod kvcache;
pub mod memory;
pub mod model;
pub mod server;
