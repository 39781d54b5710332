//! The engine thread: owns the model, every sequence and its KV cache, and runs continuous batching.
//!
//! Each step: take new requests from the bounded command channel → drop sequences whose client is gone, whose
//! time limit passed, or (draining) whose grace period ended → admit waiting requests up to `max_running` →
//! one batched forward pass over every runnable sequence (one token each for decoding sequences, one prompt
//! chunk of at most `prefill_chunk` tokens in total for prefilling ones, so a long prompt never stalls the others
//! for more than one chunk and a cancelled prefill stops at the next chunk) → sample, detokenize, stop checks →
//! publish a status snapshot. A sequence whose client does not read (its bounded event channel is full) is left
//! out of the batch until the client catches up: a slow client pauses only itself.

use super::events::{EngineStatus, Event, SeqStatus};
use super::generate::FinishReason;
use super::request::{Frontend, PromptInput, Request, RequestError, RequestLimits};
use super::sampler::Sampler;
use super::sequence::{Admission, Sequence};
use crate::calib::Profile;
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvError, KvStore, PmKvqConfig, PmKvqStore};
use crate::model::{LogitsMode, Model, ModelError, SeqInput, Tokenizer};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

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
    pub limits: RequestLimits,
}

/// The model as clients see it (`GetModelInfo`).
#[derive(Clone, Debug)]
pub struct ModelSummary {
    pub name: String,
    pub architecture: String,
    pub path: PathBuf,
    pub sha256: String,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub context_length: usize,
    pub vocab_size: usize,
    pub weight_bytes: usize,
    /// (bits, bytes per token over all layers, K and V).
    pub kv_bytes_per_token: Vec<(u32, usize)>,
    pub profile: Option<ProfileSummary>,
    pub default_kv_method: String,
    pub max_tokens_limit: usize,
}

#[derive(Clone, Debug)]
pub struct ProfileSummary {
    pub path: PathBuf,
    pub avg_bits: f64,
    pub layer_shares: Vec<f64>,
    pub layer_bits: Vec<u32>,
}

/// A started stream: its id and its events (ends with exactly one `Complete` or `Error`).
pub struct Submission {
    pub request_id: String,
    pub prompt_tokens: usize,
    pub events: mpsc::Receiver<Event>,
}

enum Command {
    Submit(Box<Admission>),
    /// Nothing to do but look at the drain signal.
    Wake,
}

/// Cloneable handle the transport uses: validates and submits requests, reads status. Never blocks.
#[derive(Clone)]
pub struct EngineHandle {
    inner: Arc<HandleInner>,
}

struct HandleInner {
    cmd: SyncSender<Command>,
    frontend: Frontend,
    max_queued: usize,
    stream_buffer: usize,
    /// Accepted requests not yet running (shared with the engine, which decrements on admission).
    pending: Arc<AtomicUsize>,
    draining: AtomicBool,
    drain: watch::Sender<Option<Instant>>,
    next_id: AtomicU64,
    status: watch::Receiver<Arc<EngineStatus>>,
    info: ModelSummary,
}

/// What the engine is started with.
pub struct EngineSetup {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub profile: Option<(Arc<Profile>, PathBuf)>,
    pub model_sha256: String,
    pub config: EngineConfig,
}

impl EngineHandle {
    /// Start the engine thread. It warms the model up (one forward pass) before reporting `ready`.
    pub fn spawn(setup: EngineSetup) -> Result<EngineHandle, ModelError> {
        let EngineSetup {
            model,
            tokenizer,
            profile,
            model_sha256,
            config,
        } = setup;
        let tokenizer = Arc::new(tokenizer);
        let info = summarize(&model, &model_sha256, profile.as_ref(), &config);
        let frontend = Frontend::new(
            tokenizer.clone(),
            model.config.context_length,
            model.config.vocab_size,
            config.limits.clone(),
            profile.map(|(p, _)| p),
        )?;
        let (cmd_tx, cmd_rx) = sync_channel(config.max_queued.max(1));
        let (status_tx, status_rx) = watch::channel(Arc::new(EngineStatus::new()));
        let (drain_tx, drain_rx) = watch::channel(None);
        let pending = Arc::new(AtomicUsize::new(0));
        let engine = Engine {
            model,
            tok: tokenizer,
            cfg: config.clone(),
            rx: cmd_rx,
            drain: drain_rx,
            pending: pending.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            closing: Vec::new(),
            status: status_tx,
            snapshot: EngineStatus::new(),
        };
        std::thread::Builder::new()
            .name("pmkvq-engine".into())
            .spawn(move || engine.run())
            .map_err(|e| ModelError::Input(format!("cannot start the engine thread: {e}")))?;
        Ok(EngineHandle {
            inner: Arc::new(HandleInner {
                cmd: cmd_tx,
                frontend,
                max_queued: config.max_queued,
                stream_buffer: config.stream_buffer.max(2),
                pending,
                draining: AtomicBool::new(false),
                drain: drain_tx,
                next_id: AtomicU64::new(1),
                status: status_rx,
                info,
            }),
        })
    }

    /// Validate, tokenize and queue a request. Errors are immediate; once this returns `Ok` the stream always
    /// ends with a `Complete` or `Error` event.
    pub fn submit(&self, req: Request) -> Result<Submission, RequestError> {
        let h = &*self.inner;
        if h.draining.load(Ordering::Acquire) {
            return Err(RequestError::Unavailable("shutting down"));
        }
        if !h.status.borrow().ready {
            return Err(RequestError::Unavailable("warming up"));
        }
        let id = if req.request_id.is_empty() {
            format!("req-{}", h.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            req.request_id.clone()
        };
        let valid = h.frontend.validate(req, id.clone())?;
        let queued = h.pending.fetch_add(1, Ordering::AcqRel);
        if queued >= h.max_queued {
            h.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(RequestError::QueueFull {
                queued,
                limit: h.max_queued,
            });
        }
        let (tx, rx) = mpsc::channel(h.stream_buffer);
        let prompt_tokens = valid.prompt_ids.len();
        let adm = Admission {
            req: valid,
            tx,
            arrived: Instant::now(),
        };
        match h.cmd.try_send(Command::Submit(Box::new(adm))) {
            Ok(()) => Ok(Submission {
                request_id: id,
                prompt_tokens,
                events: rx,
            }),
            Err(e) => {
                h.pending.fetch_sub(1, Ordering::AcqRel);
                Err(match e {
                    TrySendError::Full(_) => RequestError::QueueFull {
                        queued,
                        limit: h.max_queued,
                    },
                    TrySendError::Disconnected(_) => RequestError::Unavailable("stopped"),
                })
            }
        }
    }

    /// Token ids and each token's text.
    pub fn tokenize(&self, input: &PromptInput) -> Result<(Vec<u32>, Vec<String>), RequestError> {
        let f = &self.inner.frontend;
        let ids = match input {
            PromptInput::Text(t) if t.is_empty() => Vec::new(),
            _ => f.encode(input)?,
        };
        let pieces = ids
            .iter()
            .map(|&i| String::from_utf8_lossy(f.tokenizer.token_bytes(i, true)).into_owned())
            .collect();
        Ok((ids, pieces))
    }

    pub fn is_draining(&self) -> bool {
        self.inner.draining.load(Ordering::Acquire)
    }

    pub fn model_info(&self) -> &ModelSummary {
        &self.inner.info
    }

    pub fn status(&self) -> Arc<EngineStatus> {
        self.inner.status.borrow().clone()
    }

    /// Status snapshots as the engine publishes them (after every step).
    pub fn watch_status(&self) -> watch::Receiver<Arc<EngineStatus>> {
        self.inner.status.clone()
    }

    /// Refuse new requests; let running and queued ones finish until `grace` passes, then end them as
    /// cancelled. The engine thread exits when nothing is left (`status().stopped`).
    pub fn drain(&self, grace: Duration) {
        let h = &*self.inner;
        h.draining.store(true, Ordering::Release);
        h.drain.send_replace(Some(Instant::now() + grace));
        // Wake an idle engine now rather than at its next poll; a full channel means it is busy anyway.
        let _ = h.cmd.try_send(Command::Wake);
    }

    /// Wait until the engine thread has exited.
    pub async fn stopped(&self) {
        let mut rx = self.inner.status.clone();
        let _ = rx.wait_for(|s| s.stopped).await;
    }
}

fn summarize(model: &Model, sha: &str, profile: Option<&(Arc<Profile>, PathBuf)>, cfg: &EngineConfig) -> ModelSummary {
    let c = &model.config;
    let geom = model.kv_geometry();
    let pm = PmKvqConfig::pmkvq();
    ModelSummary {
        name: model
            .source
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        architecture: format!("{:?}", c.arch).to_lowercase(),
        path: model.source.clone(),
        sha256: sha.to_string(),
        layers: c.layers,
        heads: c.heads,
        kv_heads: c.kv_heads,
        head_dim: c.head_dim,
        context_length: c.context_length,
        vocab_size: c.vocab_size,
        weight_bytes: model.weight_bytes(),
        kv_bytes_per_token: [Bits::B16, Bits::B8, Bits::B4, Bits::B2]
            .iter()
            .map(|&b| (b.count(), PmKvqStore::token_bytes(geom, &pm, b)))
            .collect(),
        profile: profile.map(|(p, path)| ProfileSummary {
            path: path.clone(),
            avg_bits: p.settings.avg_bits,
            layer_shares: p.shares.clone(),
            layer_bits: p.bits.clone(),
        }),
        default_kv_method: cfg.limits.default_kv_method.to_string(),
        max_tokens_limit: cfg.limits.max_tokens_limit,
    }
}

struct Engine {
    model: Model,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    rx: Receiver<Command>,
    drain: watch::Receiver<Option<Instant>>,
    pending: Arc<AtomicUsize>,
    waiting: VecDeque<Admission>,
    running: Vec<Sequence>,
    /// Finished sequences whose last events the client has not taken yet (no KV held).
    closing: Vec<Sequence>,
    status: watch::Sender<Arc<EngineStatus>>,
    snapshot: EngineStatus,
}

/// Publishes `stopped` however the engine thread ends (a panic included), so waiters never hang.
struct StoppedGuard(watch::Sender<Arc<EngineStatus>>);

impl Drop for StoppedGuard {
    fn drop(&mut self) {
        self.0.send_modify(|s| {
            let mut n = (**s).clone();
            n.stopped = true;
            n.sequences.clear();
            n.kv_true_bytes = 0;
            *s = Arc::new(n);
        });
    }
}

impl Engine {
    fn run(mut self) {
        let _guard = StoppedGuard(self.status.clone());
        self.warm_up();
        self.snapshot.ready = true;
        self.publish();
        loop {
            let deadline = *self.drain.borrow();
            let idle = self.running.is_empty() && self.waiting.is_empty();
            if idle && deadline.is_some() {
                break;
            }
            let runnable = self.running.iter().any(|s| !s.paused() && !s.finished);
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
            self.housekeeping(deadline);
            self.admit();
            self.step();
            self.publish();
        }
        self.final_flush();
    }

    /// One tiny forward pass so the first request does not pay for page faults and pool start-up.
    fn warm_up(&mut self) {
        let geom = self.model.kv_geometry();
        let mut kv = crate::kvcache::F16KvStore::new(geom, 2);
        let tok = self.tok.bos.unwrap_or(0);
        let r = self.model.forward(
            &[SeqInput {
                tokens: &[tok],
                positions: &[0],
            }],
            &mut [&mut kv],
            LogitsMode::Last,
        );
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
                self.pending.fetch_sub(1, Ordering::AcqRel);
            } else if timed_out || grace_over {
                self.pending.fetch_sub(1, Ordering::AcqRel);
                let reason = if timed_out {
                    FinishReason::TimeLimit
                } else {
                    FinishReason::Cancelled
                };
                a.finish_queued(reason);
                self.snapshot.completed += 1;
            } else {
                keep.push_back(a);
            }
        }
        self.waiting = keep;
        // Running sequences.
        for s in &mut self.running {
            // A paused sequence resumes as soon as its client has taken the held events.
            if s.client_gone() || !s.flush() {
                tracing::debug!(request_id = %s.id(), "client gone; cache freed");
                s.kv = None;
                s.finished = true;
            } else if s.req.time_limit.is_some_and(|l| now >= s.arrived() + l) {
                s.finish(FinishReason::TimeLimit, None);
            } else if grace_over {
                s.finish(FinishReason::Cancelled, None);
            }
        }
        self.retire();
        for s in &mut self.closing {
            s.flush();
        }
        self.closing.retain(|s| !s.drained());
    }

    /// Move finished sequences out of the batch (their caches are already freed).
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].finished {
                let s = self.running.swap_remove(i);
                self.snapshot.completed += 1;
                if !s.drained() {
                    self.closing.push(s);
                }
            } else {
                i += 1;
            }
        }
        // Keep arrival order (swap_remove scrambles it): prefill chunks go to the oldest first.
        self.running.sort_by_key(|s| s.arrived());
    }

    fn admit(&mut self) {
        let ctx = self.model.config.context_length;
        while self.running.len() < self.cfg.max_running {
            let Some(a) = self.waiting.pop_front() else { break };
            self.pending.fetch_sub(1, Ordering::AcqRel);
            let max_tokens = (a.req.prompt_ids.len() + a.req.max_tokens).min(ctx);
            let store = a.req.kv.new_store(self.model.kv_geometry(), max_tokens);
            let sampler = Sampler::new(a.req.sampling.clone());
            match (store, sampler) {
                (Ok(kv), Ok(sampler)) => self.running.push(Sequence::new(a, kv, sampler)),
                (Err(e), _) => fail_admission(a, format!("cannot create the kv cache: {e}")),
                (_, Err(e)) => fail_admission(a, e.to_string()),
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
                    s.finish(FinishReason::KvBudget, None);
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
        let result = self.model.forward(&inputs, &mut kvs, LogitsMode::Last);
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
            Err(e) => {
                tracing::error!(error = %e, sequences = batch.len(), "forward pass failed");
                for (i, _, _) in &batch {
                    self.running[*i].finish(FinishReason::Error, Some(format!("forward pass failed: {e}")));
                }
            }
        }
        self.retire();
    }

    fn publish(&mut self) {
        let mut seqs: Vec<SeqStatus> = self.running.iter().map(Sequence::status).collect();
        seqs.extend(self.waiting.iter().map(Admission::status));
        self.snapshot.kv_true_bytes = seqs.iter().map(|s| s.kv.true_bytes).sum();
        self.snapshot.sequences = seqs;
        self.snapshot.draining = self.drain.borrow().is_some();
        self.status.send_replace(Arc::new(self.snapshot.clone()));
    }

    /// Give finished streams a last moment to take their final message.
    fn final_flush(&mut self) {
        let until = Instant::now() + FINAL_FLUSH;
        while !self.closing.is_empty() && Instant::now() < until {
            for s in &mut self.closing {
                s.flush();
            }
            self.closing.retain(|s| !s.drained());
            std::thread::sleep(PAUSED_POLL);
        }
        self.publish();
    }
}

fn fail_admission(a: Admission, msg: String) {
    tracing::error!(request_id = %a.req.request_id, error = %msg, "request failed at admission");
    let _ = a.tx.try_send(Event::Error(msg));
}
