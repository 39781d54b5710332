//! What the engine tells the outside: per-request stream events and whole-engine status snapshots.

use super::generate::FinishReason;
use crate::kvcache::KvStore;
use std::time::Instant;

/// A KV cache's state as clients see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvState {
    pub tokens: usize,
    pub true_bytes: usize,
    pub layer_bits: Vec<u32>,
    pub method: String,
}

impl KvState {
    pub fn of(store: &dyn KvStore) -> Self {
        KvState {
            tokens: store.len(0),
            true_bytes: store.true_bytes(),
            layer_bits: store.layer_bits(),
            method: store.method(),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Of the completion tokens, those inside a thinking span (its markers included).
    pub reasoning_tokens: usize,
}

/// Milliseconds from arrival.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub queue_ms: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    pub ttft_ms: f64,
    pub total_ms: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub finish: FinishReason,
    /// The stop string, or the stop token id as text, that ended the generation.
    pub stop_matched: Option<String>,
    pub usage: Usage,
    pub timings: Timings,
    pub kv: KvState,
    /// The thinking budget closed a span (the engine emitted the end-of-thinking tokens).
    pub thinking_budget_reached: bool,
    /// The memory budget closed a span (`on_memory_pressure = "conclude"`).
    pub thinking_concluded: bool,
}

/// One message on a request's stream. A stream always ends with exactly one `Complete` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    Chunk {
        text: String,
        token_ids: Vec<u32>,
        kv: Option<KvState>,
        /// The chunk's tokens are reasoning (inside a thinking span).
        reasoning: bool,
    },
    Complete(Completion),
    Error(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeqPhase {
    Queued,
    Prefill,
    Decode,
    /// The client is not reading; the sequence waits without decoding.
    Paused,
    /// Its KV cache is spilled to disk until the budget has room again.
    Preempted,
}

#[derive(Clone, Debug, PartialEq)]
pub struct SeqStatus {
    pub request_id: String,
    pub phase: SeqPhase,
    pub prompt_tokens: usize,
    pub prefilled_tokens: usize,
    pub generated_tokens: usize,
    pub priority: i32,
    /// Empty while queued (no cache yet).
    pub kv: KvState,
}

/// The engine's state after its latest step (published on a `watch` channel).
#[derive(Clone, Debug)]
pub struct EngineStatus {
    /// The model is loaded and warmed up.
    pub ready: bool,
    pub draining: bool,
    /// The engine thread has exited.
    pub stopped: bool,
    /// Why the engine gave up, when it did (a panic it could not contain); the daemon then exits non-zero.
    pub failure: Option<String>,
    pub sequences: Vec<SeqStatus>,
    pub kv_true_bytes: usize,
    pub steps: u64,
    pub completed: u64,
    pub generated_tokens: u64,
    pub started: Instant,
    /// When the engine thread last went round its loop (the service watchdog pings only while this is fresh).
    pub heartbeat: Instant,
    /// The KV budget the engine works under (all sequences together).
    pub budget_bytes: usize,
    pub budget_source: crate::memory::BudgetSource,
    pub preemptions: u64,
    pub resumptions: u64,
    /// Layer bodies lowered one level, all sequences since start.
    pub requantizations: u64,
    /// Finished requests by reason (`length`, `eos`, …, `client_gone`).
    pub finish_counts: Vec<(&'static str, u64)>,
    /// Time to first token, summed over finished requests that produced one, and their count.
    pub ttft_sum_s: f64,
    pub ttft_count: u64,
}

impl EngineStatus {
    pub fn new() -> Self {
        EngineStatus {
            ready: false,
            draining: false,
            stopped: false,
            failure: None,
            sequences: Vec::new(),
            kv_true_bytes: 0,
            steps: 0,
            completed: 0,
            generated_tokens: 0,
            started: Instant::now(),
            heartbeat: Instant::now(),
            budget_bytes: 0,
            budget_source: crate::memory::BudgetSource::Host,
            preemptions: 0,
            resumptions: 0,
            requantizations: 0,
            finish_counts: Vec::new(),
            ttft_sum_s: 0.0,
            ttft_count: 0,
        }
    }

    pub fn running(&self) -> usize {
        self.sequences
            .iter()
            .filter(|s| !matches!(s.phase, SeqPhase::Queued | SeqPhase::Preempted))
            .count()
    }

    pub fn count_finish(&mut self, reason: &'static str) {
        match self.finish_counts.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, n)) => *n += 1,
            None => self.finish_counts.push((reason, 1)),
        }
    }

    pub fn preempted(&self) -> usize {
        self.sequences.iter().filter(|s| s.phase == SeqPhase::Preempted).count()
    }

    pub fn queued(&self) -> usize {
        self.sequences.iter().filter(|s| s.phase == SeqPhase::Queued).count()
    }
}

impl Default for EngineStatus {
    fn default() -> Self {
        Self::new()
    }
}
