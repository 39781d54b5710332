//! Quality harness: how far each KV method moves the model's next-token distribution away from the f16 cache,
//! at equal memory.
//!
//! Owns: teacher-forced divergence runs (all methods in lockstep over one token sequence, so no reference logits
//! are kept), free-running greedy agreement, and the report (JSON, Markdown, SVG plot). Does not own: models,
//! stores or sampling.
#![forbid(unsafe_code)]

pub mod divergence;
pub mod report;
pub mod retrieval;

pub use crate::kvcache::MethodSpec;
pub use divergence::{run_divergence, DivergenceConfig, DivergenceReport, MethodResult};
