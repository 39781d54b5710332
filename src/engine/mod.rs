//! Request lifecycle: sampling, stop criteria, incremental detokenizing, and the generation loop.
//!
//! Owns: turning logits into tokens and tokens into text a client can be sent. Does not own: gRPC types, memory
//! monitoring, weights or KV layout. Invariants: emitted text is always whole UTF-8 characters; text that could
//! still become a stop string is held back until it cannot.
#![forbid(unsafe_code)]

pub mod detok;
pub mod generate;
pub mod sampler;
pub mod stop;

pub use detok::Detokenizer;
pub use generate::{generate, FinishReason, GenerateOutput, GenerateRequest};
pub use sampler::{Sampler, SamplingError, SamplingParams};
pub use stop::StopChecker;
