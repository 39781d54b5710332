//! pmkvq: an LLM inference engine for edge devices whose KV cache follows a memory budget with PM-KVQ,
//! progressive mixed-precision KV-cache quantization.
//!
//! # Layout (bottom layer first; a module imports only lower layers — `tests/architecture.rs`)
//! - [`cpu`], [`units`], [`fetch`]: CPU kernels over plain slices (weight-block dots, f16/f32 dot, axpy, exp);
//!   byte-size and duration spellings; the default model, fetched from the package registry and checked.
//! - [`memory`]: memory samplers (host, cgroup, PSI, Jetson, device) and the policy that turns them into a
//!   live KV `Budget`.
//! - [`kvcache`]: KV stores and attention over them (the f16 reference, PM-KVQ's packed store, KIVI, q8_0/q4_0),
//!   the packed-code attention kernels, true-byte accounting, spill files.
//! - [`gpu`]: the CUDA backend (NVRTC kernels for quantize / ERS shrink / decode attention, device memory); a
//!   stub with the same API when the feature is off.
//! - [`model`]: GGUF/safetensors loading, the Llama/Qwen2 forward pass (KV kept outside the model), tokenizer,
//!   chat template.
//! - [`calib`]: offline calibration (per-layer bit allocation, key reparameterization) and the profile file.
//! - [`engine`]: the engine thread (continuous batching over sequences, each with its own KV cache), request
//!   validation, the budget policy, sampling, stop criteria, incremental detokenization; the CLI's local loop
//!   runs the same `Sequence`.
//! - [`doctor`]: `pmkvq doctor`, the platform and configuration check.
//! - [`eval`]: the quality harness (divergence from the f16 cache at equal memory).
//! - [`server`], [`config`]: the gRPC front end (`pmkvq.v1`, health, reflection, metrics; wire ⇄ engine
//!   conversion); the only reader of config files, `PMKVQ_*` variables and pmkvqd's argv.
//! - [`app`]: the daemon's wiring (start-up, then supervision and drain); `pmkvqd` and the tests both run it.
//!
//! # Data flow (daemon)
//! client ─Generate─▶ `server` (validate wire values) → `EngineHandle::submit` (tokenize, check bounds) ──▶ bounded
//! command channel ──▶ engine thread: each step admits waiting requests, drops cancelled ones (freeing their KV),
//! runs one batched `Model::forward` over every running sequence's `KvStore`, samples, detokenizes, checks stops
//! ──▶ bounded per-stream event channel (full: that sequence pauses) ──▶ response stream.

pub mod app;
pub mod calib;
pub mod config;
pub mod cpu;
pub mod doctor;
pub mod engine;
pub mod eval;
pub mod fetch;
pub mod fuzz;
pub mod gpu;
pub mod kvcache;
pub mod memory;
pub mod model;
pub mod server;
pub mod units;
