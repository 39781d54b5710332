//! The engine thread: owns the model, every sequence and its KV cache, and runs continuous batching.
//!
//! Each step ([`Engine::run`]): take new requests from the bounded command channel → `housekeeping` drops
//! sequences whose client is gone, whose time limit passed, or (draining) whose grace period ended → `resume`
//! brings preempted sequences back while their floors fit → `admit` starts waiting requests up to `max_running`
//! → `apply_budget` fits every cache to the live budget → `step` runs one batched forward pass over every
//! runnable sequence (one token each for decoding sequences, one prompt chunk of at most `prefill_chunk` tokens
//! in total for prefilling ones, so a long prompt never stalls the others for more than one chunk) → sample,
//! detokenize, stop checks → `publish` a status snapshot. A sequence whose client does not read (its bounded
//! event channel is full) is left out of the batch until the client catches up: a slow client pauses only
//! itself.
//!
//! # Where a budget cut is applied
//! The memory monitor (or `SetMemoryBudget`) sends a new [`Budget`] on the watch channel; the next step's
//! [`Engine::apply_budget`], before any forward pass:
//! 1. reads the budget (`borrow_and_update`) and records it as the one applied;
//! 2. sums every running sequence's floor for its next step (`KvStore::floor_bytes`);
//! 3. while the floors exceed the budget, [`budget::victim`] picks the lowest-priority, newest sequence and
//!    `preempt` spills its cache to disk (a lone sequence that cannot fit ends with `memory_pressure`);
//! 4. [`budget::water_fill`] splits the budget: floors first, the rest by [`budget::weight`] up to each
//!    sequence's [`budget::demand`];
//! 5. each store's `set_total_budget` splits its share over layers (calibrated shares) and lowers bodies now
//!    (ERS, 16→8→4→2), so true bytes are within the budget before the step runs;
//! 6. a status snapshot is published at once, before the step.
//!
//! Admission and resumption ask [`budget::fits`] with the same floors, so a cut also holds new work back.

use super::budget;
use super::events::{EngineStatus, Event, SeqStatus};
use super::fault::{self, FaultHook, FaultPoint};
use super::generate::FinishReason;
use super::handle::Command;
use super::request::RequestLimits;
use super::sampler::Sampler;
use super::sequence::{Admission, Sequence};
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvError, KvStore, PmkvqConfig, PmkvqStore};
use crate::memory::Budget;
use crate::model::{Backend, LogitsMode, Model, ModelError, SeqInput, Tokenizer};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

mod ending;
mod memory;
use crate::model::panic_text;
use ending::StoppedGuard;

/// How long the idle engine sleeps between looks at the drain signal (it wakes at once for a command).
const IDLE_POLL: Duration = Duration::from_millis(50);
/// How long the paused-only engine waits for a client to read before looking again.
const PAUSED_POLL: Duration = Duration::from_millis(2);
/// After the grace period, how long finished streams get to take their last message before the engine exits.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Sequences decoding at once (the batch).
    pub max_running: usize,
    /// Accepted requests waiting for a batch slot; one more is refused with `QueueFull`. Also the command
    /// channel's capacity.
    pub max_queued: usize,
    /// Prompt tokens per step across all prefilling sequences.
    pub prefill_chunk: usize,
    /// Events buffered per stream before the sequence pauses for its client.
    pub stream_buffer: usize,
    /// A paused sequence (its client not reading) ends after this long; while paused it takes no batch slot.
    pub pause_timeout: Duration,
    pub limits: RequestLimits,
    /// Threads that tokenize prompts and render chat templates (off the network runtime); requests beyond them
    /// wait, each holding its queue slot.
    pub prepare_threads: usize,
    /// Test-only fault injection (see `fault.rs`); `None` in production.
    pub fault: Option<FaultHook>,
    /// `on_memory_pressure = "conclude"`: a sequence inside a thinking span whose floor cannot take this many
    /// more tokens in its share of the budget has its span closed, so it answers before the budget ends it.
    pub conclude_reserve: Option<usize>,
}

/// What [`EngineHandle::spawn`](super::EngineHandle::spawn) hands the engine thread.
pub(super) struct EngineParts {
    pub model: Arc<Model>,
    pub compute: Arc<dyn Backend>,
    pub tok: Arc<Tokenizer>,
    pub cfg: EngineConfig,
    pub rx: Receiver<Command>,
    pub drain: watch::Receiver<Option<Instant>>,
    pub pending: Arc<AtomicUsize>,
    pub intake_closed: Arc<Mutex<bool>>,
    pub status: watch::Sender<Arc<EngineStatus>>,
    pub budget: watch::Receiver<Budget>,
    pub spill: crate::kvcache::spill::SpillDir,
}

pub(super) struct Engine {
    model: Arc<Model>,
    /// Runs the forward pass and makes the caches it reads (the CPU model, or its copy on a GPU).
    compute: Arc<dyn Backend>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    drain: watch::Receiver<Option<Instant>>,
    pending: Arc<AtomicUsize>,
    /// Closed (under its lock) when the loop ends, so no submission is left unanswered in the channel.
    intake_closed: Arc<Mutex<bool>>,
    waiting: VecDeque<Admission>,
    running: Vec<Sequence<'static>>,
    /// Finished sequences whose last events the client has not taken yet (no KV held).
    closing: Vec<Sequence<'static>>,
    status: watch::Sender<Arc<EngineStatus>>,
    snapshot: EngineStatus,
    budget: watch::Receiver<Budget>,
    spill: crate::kvcache::spill::SpillDir,
    /// Preempted sequences, their caches on disk.
    spilled: Vec<Sequence<'static>>,
    spill_seq: u64,
    /// Distinguishes this engine's spill files from another engine's in the same process.
    engine_nonce: u64,
    /// Re-quantizations of sequences that are gone.
    requants_done: u64,
    /// Indices into `running` of the step being computed (a panic in it ends these). Stable for the whole
    /// step: sequences leave `running` only in the `retire` after it. The buffer is reused step to step.
    in_step: Vec<usize>,
    /// True bytes of one token at 16 bits in every layer (a sequence's demand is this times its length).
    f16_token_bytes: usize,
}

impl Engine {
    pub(super) fn new(p: EngineParts) -> Engine {
        let geom = p.model.kv_geometry();
        Engine {
            model: p.model,
            compute: p.compute,
            tok: p.tok,
            cfg: p.cfg,
            rx: p.rx,
            drain: p.drain,
            pending: p.pending,
            intake_closed: p.intake_closed,
            waiting: VecDeque::new(),
            running: Vec::new(),
            closing: Vec::new(),
            status: p.status,
            snapshot: EngineStatus::new(),
            budget: p.budget,
            spill: p.spill,
            spilled: Vec::new(),
            spill_seq: 0,
            engine_nonce: {
                static ENGINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                ENGINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            },
            requants_done: 0,
            in_step: Vec::new(),
            f16_token_bytes: PmkvqStore::token_bytes(geom, &PmkvqConfig::pmkvq(), Bits::B16),
        }
    }

    pub(super) fn run(mut self) {
        let _guard = StoppedGuard(self.status.clone());
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.warm_up())) {
            return self.give_up(&format!("warm-up panicked: {}", panic_text(p.as_ref())));
        }
        self.snapshot.ready = true;
        self.publish();
        loop {
            let deadline = *self.drain.borrow();
            let idle = self.running.is_empty() && self.waiting.is_empty() && self.spilled.is_empty();
            if idle && deadline.is_some() {
                break;
            }
            // A budget change must reach the caches even when nothing decodes.
            let runnable =
                self.running.iter().any(|s| !s.paused() && !s.finished) || self.budget.has_changed().unwrap_or(false);
            // Block for work only when there is nothing to compute.
            let first = if idle && self.closing.is_empty() {
                Some(self.rx.recv_timeout(IDLE_POLL))
            } else if !runnable {
                Some(self.rx.recv_timeout(PAUSED_POLL))
            } else {
                None
            };
            match first {
                Some(Ok(c)) => self.on_command(c),
                Some(Err(RecvTimeoutError::Disconnected)) if idle => break,
                _ => {}
            }
            while let Ok(c) = self.rx.try_recv() {
                self.on_command(c);
            }
            // Between steps the engine's own bookkeeping changes: a panic there leaves it in an unknown state,
            // so the engine gives up (every stream ends with `error`, health turns NOT_SERVING, the daemon exits
            // non-zero and its supervisor restarts it).
            let new_budget = self.budget.has_changed().unwrap_or(false);
            let between = catch_unwind(AssertUnwindSafe(|| {
                self.housekeeping(deadline);
                self.resume();
                self.admit();
                self.apply_budget();
            }));
            if let Err(p) = between {
                return self.give_up(&format!("panicked between steps: {}", panic_text(p.as_ref())));
            }
            // A new budget is applied (caches lowered, spilled or ended) before the step: say so now rather than
            // a whole forward pass later, so whoever cut it — the monitor, an operator — sees it take effect.
            if new_budget {
                self.publish();
                self.flush_closing();
            }
            // A panic inside a step is that step's: its sequences end with `error`, the engine goes on.
            if let Err(p) = catch_unwind(AssertUnwindSafe(|| self.step())) {
                self.contain_step_panic(&panic_text(p.as_ref()));
            }
            self.publish();
            self.flush_closing();
        }
        fault::check(&self.cfg.fault, FaultPoint::EngineExit, "");
        self.close_intake();
        self.final_flush();
    }

    /// One tiny forward pass so the first request does not pay for page faults and pool start-up.
    fn warm_up(&mut self) {
        fault::check(&self.cfg.fault, FaultPoint::WarmUp, "");
        let geom = self.model.kv_geometry();
        let spec = crate::kvcache::MethodSpec::plain(crate::kvcache::KvMethod::Fp16, None, "warm-up");
        let tok = self.tok.bos.unwrap_or(0);
        let r = self
            .compute
            .new_store(&spec, geom, 2)
            .map_err(Into::into)
            .and_then(|mut kv| {
                self.compute.forward(
                    &[SeqInput {
                        tokens: &[tok],
                        positions: &[0],
                    }],
                    &mut [kv.as_mut()],
                    LogitsMode::Last,
                )
            });
        if let Err(e) = r {
            tracing::warn!(error = %e, "warm-up forward pass failed");
        }
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::Submit(a) => {
                tracing::debug!(request_id = %a.req.request_id, prompt_tokens = a.req.prompt_ids.len(), "queued");
                self.waiting.push_back(*a);
            }
            Command::Wake => {}
        }
    }

    /// Drop what nobody waits for; end what ran out of time.
    fn housekeeping(&mut self, drain_deadline: Option<Instant>) {
        let now = Instant::now();
        let grace_over = drain_deadline.is_some_and(|d| now >= d);
        // Queued requests.
        let mut keep = VecDeque::with_capacity(self.waiting.len());
        for a in self.waiting.drain(..) {
            let timed_out = a.req.time_limit.is_some_and(|l| now >= a.arrived + l);
            if a.tx.is_closed() {
                // gone while queued: it ends here, and is counted like any other request that ended
                self.pending.fetch_sub(1, Ordering::AcqRel);
                self.snapshot.completed += 1;
                self.snapshot.count_finish("client_gone");
            } else if timed_out || grace_over {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                let reason = if timed_out {
                    FinishReason::TimeLimit
                } else {
                    FinishReason::Cancelled
                };
                a.finish_queued(reason);
                self.snapshot.completed += 1;
                self.snapshot.count_finish(reason.as_str());
            } else {
                keep.push_back(a);
            }
        }
        self.waiting = keep;
        // Running sequences.
        for s in &self.running {
            fault::check(&self.cfg.fault, FaultPoint::Housekeeping, s.id());
        }
        for s in &mut self.running {
            // A paused sequence resumes as soon as its client has taken the held events; one whose client has not
            // read for `pause_timeout` ends, so clients that never read cannot hold memory forever.
            let gone = s.client_gone() || !s.flush();
            expire(s, gone, now, grace_over);
            if !s.finished && s.paused_for(now) >= self.cfg.pause_timeout {
                tracing::info!(request_id = %s.id(), "the client has not read for the pause timeout; cancelled");
                s.finish(FinishReason::Cancelled, None);
            }
        }
        // Preempted sequences: the same rules (their spill files go with them).
        let mut i = 0;
        while i < self.spilled.len() {
            let s = &mut self.spilled[i];
            let gone = s.client_gone();
            expire(s, gone, now, grace_over);
            if s.finished {
                let s = self.spilled.swap_remove(i);
                self.settle(s);
            } else {
                i += 1;
            }
        }
        self.retire();
    }

    /// Deliver the last events of finished sequences. Called after `publish`, so the status a client reads once
    /// it has its `complete` no longer shows that sequence or its cache.
    fn flush_closing(&mut self) {
        for s in &mut self.closing {
            s.flush();
        }
        self.closing.retain(|s| !s.drained());
    }

    /// Batch slots in use: running sequences that can step. A paused one (its client not reading) gives its slot
    /// up, so streams that stop reading cannot starve everyone else; it keeps its cache (within the budget,
    /// preemptible) until it resumes or `pause_timeout` ends it.
    fn batch_slots_used(&self) -> usize {
        self.running.iter().filter(|s| !s.paused()).count()
    }

    fn budget_bytes(&self) -> usize {
        self.budget.borrow().bytes.min(usize::MAX as u64) as usize
    }

    /// Account for a sequence that ended; keep it only while its last events wait for the client.
    fn settle(&mut self, s: Sequence<'static>) {
        self.snapshot.completed += 1;
        self.snapshot
            .count_finish(s.reason.map_or("client_gone", FinishReason::as_str));
        if let Some(t) = s.ttft() {
            self.snapshot.ttft_sum_s += t.as_secs_f64();
            self.snapshot.ttft_count += 1;
        }
        self.requants_done = self.requants_done.saturating_add(s.requantizations());
        if !s.drained() {
            self.closing.push(s);
        }
    }

    /// Move finished sequences out of the batch (their caches are already freed).
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished {
                let s = self.running.swap_remove(i);
                self.settle(s);
            } else {
                i += 1;
            }
        }
        // Keep arrival order (swap_remove scrambles it): prefill chunks go to the oldest first.
        self.running.sort_by_key(|s| s.arrived());
    }

    /// Start waiting requests, oldest first, while there is a batch slot and their first step's floor fits the
    /// budget next to the running sequences' floors (otherwise they keep waiting: the budget may grow).
    fn admit(&mut self) {
        let ctx = self.model.config.context_length;
        let total = self.budget_bytes();
        let mut used = self.used_floor() + self.spilled.iter().map(|s| s.resume_floor).sum::<usize>();
        while self.batch_slots_used() < self.cfg.max_running {
            let Some(a) = self.waiting.pop_front() else { break };
            let max_len = budget::max_len(a.req.prompt_ids.len(), a.req.max_tokens, ctx);
            let store = self
                .compute
                .new_store(&a.req.kv, self.model.kv_geometry(), max_len)
                .map(|kv| fault::wrap_store(&self.cfg.fault, kv, &a.req.request_id));
            let sampler = Sampler::new(a.req.sampling.clone());
            match (store, sampler) {
                (Ok(kv), Ok(sampler)) => {
                    let first = kv.floor_bytes(budget::first_step_tokens(
                        a.req.prompt_ids.len(),
                        self.cfg.prefill_chunk,
                    ));
                    if !budget::fits(used, first, total) {
                        self.waiting.push_front(a);
                        break;
                    }
                    used += first;
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    self.running.push(Sequence::new(a, kv, sampler, max_len));
                }
                (Err(e), _) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    fail_admission(a, format!("cannot create the kv cache: {e}"));
                }
                (_, Err(e)) => {
                    self.pending.fetch_sub(1, Ordering::AcqRel);
                    fail_admission(a, e.to_string());
                }
            }
        }
    }

    fn step(&mut self) {
        let ctx = self.model.config.context_length;
        // Choose inputs: every decoding sequence's token, then prompt chunks oldest-first within the budget.
        let mut budget = self.cfg.prefill_chunk.max(1);
        let mut batch: Vec<(usize, Vec<u32>, Vec<u32>)> = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            let prefilling = s.prefilled < s.prompt_len();
            let chunk = if prefilling { budget } else { 1 };
            if chunk == 0 {
                continue;
            }
            if let Some((t, p)) = s.next_input(chunk) {
                if prefilling {
                    budget -= t.len();
                }
                batch.push((i, t, p));
            }
        }
        // Every store confirms room for its tokens first, so one full cache cannot fail the whole batch.
        batch.retain(|(i, t, _)| {
            let s = &mut self.running[*i];
            match s.kv.as_mut().map(|kv| kv.reserve(t.len())) {
                Some(Ok(())) => true,
                Some(Err(KvError::OutOfBudget { .. })) => {
                    s.finish(FinishReason::MemoryPressure, None);
                    false
                }
                Some(Err(e)) => {
                    s.finish(FinishReason::Error, Some(format!("kv cache: {e}")));
                    false
                }
                None => false,
            }
        });
        if batch.is_empty() {
            self.retire();
            return;
        }
        self.in_step.clear();
        self.in_step.extend(batch.iter().map(|(i, _, _)| *i));
        for &i in &self.in_step {
            fault::check(&self.cfg.fault, FaultPoint::Step, self.running[i].id());
        }
        let inputs: Vec<SeqInput<'_>> = batch
            .iter()
            .map(|(_, t, p)| SeqInput {
                tokens: t,
                positions: p,
            })
            .collect();
        let mut kvs: Vec<&mut dyn KvStore> = Vec::with_capacity(batch.len());
        {
            let mut want = batch.iter().map(|(i, _, _)| *i).peekable();
            for (i, s) in self.running.iter_mut().enumerate() {
                if want.peek() == Some(&i) {
                    want.next();
                    if let Some(kv) = s.kv.as_deref_mut() {
                        kvs.push(kv);
                    }
                }
            }
        }
        let result = self.compute.forward(&inputs, &mut kvs, LogitsMode::Last);
        drop(kvs);
        self.snapshot.steps += 1;
        match result {
            Ok(mut logits) => {
                for ((i, t, _), l) in batch.iter().zip(logits.iter_mut()) {
                    let s = &mut self.running[*i];
                    let before = s.generated;
                    if let Some(reason) = s.on_logits(t.len(), l, &self.tok, ctx) {
                        s.finish(reason, None);
                    }
                    self.snapshot.generated_tokens += (s.generated - before) as u64;
                }
            }
            Err(ModelError::InSequence { index, source }) if index < batch.len() => {
                // One sequence's input or cache failed: it ends; the others take back whatever part of the
                // step their caches hold and run it again next step.
                let bad = batch[index].0;
                tracing::error!(request_id = %self.running[bad].id(), error = %source, "forward pass failed for one sequence");
                self.running[bad].finish(FinishReason::Error, Some(format!("forward pass failed: {source}")));
                for (k, (i, _, p)) in batch.iter().enumerate() {
                    if k != index {
                        // a step's first position is what the cache held before it
                        self.running[*i].roll_back_to(p[0] as usize);
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, sequences = batch.len(), "forward pass failed");
                for (i, _, _) in &batch {
                    self.running[*i].finish(FinishReason::Error, Some(format!("forward pass failed: {e}")));
                }
            }
        }
        self.in_step.clear();
        self.retire();
    }

    fn publish(&mut self) {
        fault::check(&self.cfg.fault, FaultPoint::Publish, "");
        let mut seqs: Vec<SeqStatus> = self.running.iter().map(Sequence::status).collect();
        seqs.extend(self.spilled.iter().map(Sequence::status));
        seqs.extend(self.waiting.iter().map(Admission::status));

        self.snapshot.requantizations = self.requants_done
            + self
                .running
                .iter()
                .chain(&self.spilled)
                .map(Sequence::requantizations)
                .sum::<u64>();
        self.snapshot.kv_true_bytes = seqs.iter().map(|s| s.kv.true_bytes).sum();
        self.snapshot.sequences = seqs;
        self.snapshot.draining = self.drain.borrow().is_some();
        self.snapshot.heartbeat = Instant::now();
        self.status.send_replace(Arc::new(self.snapshot.clone()));
    }
}

/// End `s` if its client is gone (cache freed, nothing to send), its time limit passed, or the drain's grace ended.
fn expire(s: &mut Sequence<'_>, client_gone: bool, now: Instant, grace_over: bool) {
    if client_gone {
        tracing::debug!(request_id = %s.id(), "client gone; cache freed");
        s.release_kv();
        s.finished = true;
    } else if s.req.time_limit.is_some_and(|l| now >= s.arrived() + l) {
        s.finish(FinishReason::TimeLimit, None);
    } else if grace_over {
        s.finish(FinishReason::Cancelled, None);
    }
}

fn fail_admission(a: Admission, msg: String) {
    tracing::error!(request_id = %a.req.request_id, error = %msg, "request failed at admission");
    let _ = a.tx.try_send(Event::Error(msg));
}
