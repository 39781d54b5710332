//! Request lifecycle: validation, continuous batching, sampling, stop criteria, incremental detokenizing.
//!
//! Owns: the engine thread (model, sequences, their KV caches), turning logits into tokens and tokens into text a
//! client can be sent. Does not own: gRPC types (no tonic/prost here), memory monitoring, weights or KV layout.
//! Invariants: emitted text is always whole UTF-8 characters; text that could still become a stop string is held
//! back until it cannot; every accepted stream ends with exactly one `Complete` or `Error` event; a sequence's KV
//! cache is freed the step its client goes away.
#![forbid(unsafe_code)]

pub mod budget;
pub mod detok;
pub mod events;
pub mod fault;
pub mod generate;
pub mod handle;
pub mod request;
pub mod sampler;
pub mod scheduler;
pub mod sequence;
pub mod stop;
pub mod thinking;

pub use detok::Detokenizer;
pub use events::{Completion, EngineStatus, Event, KvState, SeqPhase, SeqStatus, Timings, Usage};
pub use fault::{FaultHook, FaultPoint};
pub use generate::{generate, FinishReason, GenerateOutput, GenerateRequest};
pub use handle::{EngineHandle, EngineSetup, ModelSummary, ProfileSummary, QueueSlot, Submission};
pub use request::{
    is_printable_id_char, ChatMessage, Frontend, PromptInput, Request, RequestError, RequestLimits, SamplingOverrides,
    ValidRequest,
};
pub use sampler::{Sampler, SamplingError, SamplingParams};
pub use scheduler::EngineConfig;
pub use stop::StopChecker;
pub use thinking::{ThinkMarkers, Thinking};
