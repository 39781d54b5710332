//! One running request inside the engine: its KV store, sampler, detokenizer and stop state, and the events it
//! still has to deliver. The scheduler decides when it runs; this file decides what a token means.

use super::detok::Detokenizer;
use super::events::{Completion, Event, KvState, SeqPhase, SeqStatus, Timings, Usage};
use super::generate::FinishReason;
use super::request::ValidRequest;
use super::sampler::Sampler;
use super::stop::StopChecker;
use crate::kvcache::KvStore;
use crate::model::Tokenizer;
use std::collections::VecDeque;
use std::time::Instant;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::mpsc::Sender;

/// Ms between two instants (0 when `b` is before `a`).
fn ms(a: Instant, b: Instant) -> f64 {
    b.saturating_duration_since(a).as_secs_f64() * 1e3
}

/// A request that was accepted: its events go to `tx`.
pub struct Admission {
    pub req: ValidRequest,
    pub tx: Sender<Event>,
    pub arrived: Instant,
}

/// `'kv`: how long the cache lives — `'static` for the daemon's own caches, the caller's borrow for the CLI's
/// local loop ([`super::generate`]).
pub struct Sequence<'kv> {
    pub req: ValidRequest,
    tx: Sender<Event>,
    /// `None` once finished (the cache is freed the moment the sequence ends) or while spilled.
    pub kv: Option<Box<dyn KvStore + 'kv>>,
    /// Where the cache waits while the sequence is preempted.
    pub spill: Option<crate::kvcache::spill::SpillFile>,
    /// Bytes the cache needs at its floor to take its next step (kept while spilled).
    pub resume_floor: usize,
    /// Prompt plus max_tokens, capped at the context: the most tokens the cache will hold.
    pub max_len: usize,
    /// Re-quantizations of caches this sequence had before (kept across a spill).
    pub requants_before: u64,
    sampler: Sampler,
    detok: Detokenizer,
    stops: StopChecker,
    /// Prompt plus generated tokens (repetition penalty window).
    history: Vec<u32>,
    pub generated: usize,
    /// Prompt tokens already in the cache.
    pub prefilled: usize,
    /// The token the next decode step feeds.
    pub next: Option<u32>,
    /// Events not yet accepted by the client's channel (full): the sequence waits until they are.
    held: VecDeque<Event>,
    /// Since when `held` has been waiting (the client stopped reading).
    paused_since: Option<Instant>,
    arrived: Instant,
    started: Instant,
    first_token: Option<Instant>,
    stop_matched: Option<String>,
    /// A stop string matched: text held back after it is dropped, not released.
    text_cut: bool,
    /// Where it is in thinking spans (reasoning tokens so far, the budget's forced tokens).
    think: super::thinking::ThinkState,
    /// Why it ended (`None` while running, or when the client went away).
    pub reason: Option<FinishReason>,
    pub finished: bool,
}

impl<'kv> Sequence<'kv> {
    pub fn new(a: Admission, kv: Box<dyn KvStore + 'kv>, sampler: Sampler, max_len: usize) -> Self {
        let stops = StopChecker::new(a.req.stop.clone());
        let think = super::thinking::ThinkState::new(a.req.thinking.as_ref());
        let history = a.req.prompt_ids.clone();
        Sequence {
            req: a.req,
            tx: a.tx,
            kv: Some(kv),
            spill: None,
            resume_floor: 0,
            max_len,
            requants_before: 0,
            sampler,
            detok: Detokenizer::new(),
            stops,
            history,
            generated: 0,
            prefilled: 0,
            next: None,
            held: VecDeque::new(),
            paused_since: None,
            arrived: a.arrived,
            started: Instant::now(),
            first_token: None,
            stop_matched: None,
            text_cut: false,
            think,
            reason: None,
            finished: false,
        }
    }

    /// Arrival to first generated token.
    pub fn ttft(&self) -> Option<std::time::Duration> {
        self.first_token.map(|f| f.saturating_duration_since(self.arrived))
    }

    pub fn arrived(&self) -> Instant {
        self.arrived
    }

    pub fn id(&self) -> &str {
        &self.req.request_id
    }

    /// Tokens the next step stores (a prompt chunk of at most `chunk`, or one decode token).
    pub fn ahead(&self, chunk: usize) -> usize {
        if self.prefilled < self.prompt_len() {
            (self.prompt_len() - self.prefilled).min(chunk.max(1))
        } else {
            1
        }
    }

    pub fn client_gone(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waiting for the client to take earlier events.
    pub fn paused(&self) -> bool {
        !self.held.is_empty()
    }

    /// How long the client has not taken this sequence's events (zero while it reads).
    pub fn paused_for(&self, now: Instant) -> std::time::Duration {
        self.paused_since
            .map_or(std::time::Duration::ZERO, |t| now.saturating_duration_since(t))
    }

    pub fn prompt_len(&self) -> usize {
        self.req.prompt_ids.len()
    }

    /// Tokens the next forward pass feeds: the next prompt chunk (at most `chunk`) or the decode token.
    pub fn next_input(&self, chunk: usize) -> Option<(Vec<u32>, Vec<u32>)> {
        if self.finished || self.paused() {
            return None;
        }
        let stored = self.kv.as_ref()?.len(0) as u32;
        if self.prefilled < self.prompt_len() {
            let end = (self.prefilled + chunk).min(self.prompt_len());
            let toks = self.req.prompt_ids[self.prefilled..end].to_vec();
            let pos = (stored..stored + toks.len() as u32).collect();
            return Some((toks, pos));
        }
        self.next.map(|t| (vec![t], vec![stored]))
    }

    /// Queue an event and push what the channel takes. Returns false if the client is gone.
    pub fn emit(&mut self, ev: Event) -> bool {
        self.held.push_back(ev);
        self.flush()
    }

    /// Deliver held events while the channel has room. Returns false if the client is gone.
    pub fn flush(&mut self) -> bool {
        let open = self.deliver();
        if self.held.is_empty() {
            self.paused_since = None;
        } else {
            self.paused_since.get_or_insert_with(Instant::now);
        }
        open
    }

    fn deliver(&mut self) -> bool {
        while let Some(ev) = self.held.pop_front() {
            match self.tx.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.held.push_front(ev);
                    return true;
                }
                Err(TrySendError::Closed(_)) => {
                    self.held.clear();
                    return false;
                }
            }
        }
        true
    }

    /// Everything delivered (or nobody to deliver to).
    pub fn drained(&self) -> bool {
        self.held.is_empty() || self.client_gone()
    }

    fn kv_state(&self) -> KvState {
        self.kv.as_deref().map(KvState::of).unwrap_or_default()
    }

    /// Handle the logits of a forward pass that fed `fed` tokens. Returns the finish reason when the sequence
    /// ends with this step.
    pub fn on_logits(&mut self, fed: usize, logits: &mut [f32], tok: &Tokenizer, ctx: usize) -> Option<FinishReason> {
        if self.prefilled < self.prompt_len() {
            self.prefilled += fed;
            if self.prefilled < self.prompt_len() {
                return None;
            }
        }
        let thinking = self.req.thinking.as_ref();
        let t = match self.think.forced_next(thinking) {
            Some(t) => t,
            None => self.sampler.sample(logits, &self.history),
        };
        self.history.push(t);
        self.generated += 1;
        self.first_token.get_or_insert_with(Instant::now);
        let every = self.req.kv_state_every;
        let kv = (every > 0 && self.generated.is_multiple_of(every)).then(|| self.kv_state());
        // An ending token is streamed by id (clients keep exact token histories) but has no text.
        let ending = if self.req.stop_token_ids.contains(&t) {
            self.stop_matched = Some(t.to_string());
            Some(FinishReason::Stop)
        } else if tok.is_eos(t) && !self.req.ignore_eos {
            Some(FinishReason::Eos)
        } else {
            None
        };
        let (reasoning, marker) = self.think.observe(thinking, t);
        if let Some(reason) = ending {
            self.emit(Event::Chunk {
                text: String::new(),
                token_ids: vec![t],
                kv,
                reasoning,
            });
            return Some(reason);
        }
        // A span marker is streamed by id without text: reasoning reads without its tags.
        let piece = if marker {
            String::new()
        } else {
            self.detok.push(tok.token_bytes(t, false))
        };
        let fed = self.stops.feed(&piece);
        self.emit(Event::Chunk {
            text: fed.emit,
            token_ids: vec![t],
            kv,
            reasoning,
        });
        if let Some(s) = fed.matched {
            self.stop_matched = Some(s);
            self.text_cut = true;
            return Some(FinishReason::Stop);
        }
        if self.generated >= self.req.max_tokens {
            return Some(FinishReason::Length);
        }
        let stored = self.kv.as_ref().map_or(0, |k| k.len(0));
        if stored + 1 >= ctx {
            return Some(FinishReason::ContextLimit);
        }
        self.next = Some(t);
        None
    }

    /// `on_memory_pressure = "conclude"`: close the thinking span at the next token (see
    /// [`super::thinking::ThinkState::conclude`]).
    pub fn conclude_thinking(&mut self) -> bool {
        !self.finished && self.think.conclude(self.req.thinking.as_ref())
    }

    /// End the sequence: release held-back text (unless a stop string matched), queue the completion, free the
    /// cache. Idempotent.
    pub fn finish(&mut self, reason: FinishReason, error: Option<String>) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.next = None;
        self.reason = Some(if error.is_some() { FinishReason::Error } else { reason });
        if !self.text_cut && error.is_none() {
            let rest = self.stops.feed(&self.detok.finish()).emit + &self.stops.finish();
            if !rest.is_empty() {
                self.emit(Event::Chunk {
                    text: rest,
                    token_ids: Vec::new(),
                    kv: None,
                    reasoning: self.think.inside,
                });
            }
        }
        let now = Instant::now();
        let ev = match error {
            Some(msg) => Event::Error(msg),
            None => Event::Complete(Completion {
                finish: reason,
                stop_matched: self.stop_matched.take(),
                usage: Usage {
                    prompt_tokens: self.prompt_len(),
                    completion_tokens: self.generated,
                    reasoning_tokens: self.think.reasoning_tokens,
                },
                timings: Timings {
                    queue_ms: ms(self.arrived, self.started),
                    prefill_ms: ms(self.started, self.first_token.unwrap_or(now)),
                    decode_ms: self.first_token.map_or(0.0, |f| ms(f, now)),
                    ttft_ms: self.first_token.map_or(0.0, |f| ms(self.arrived, f)),
                    total_ms: ms(self.arrived, now),
                },
                kv: self.kv_state(),
                thinking_budget_reached: self.think.budget_reached,
                thinking_concluded: self.think.concluded,
            }),
        };
        // (the completion above carries the cache's last state)
        self.release_kv();
        // Held, not sent: the owner delivers it (`flush`) once the state it publishes no longer shows this
        // sequence, so a client that has its `complete` and then asks for the status never finds it running.
        self.held.push_back(ev);
    }

    /// Free the cache, keeping its re-quantization count.
    pub fn release_kv(&mut self) {
        if let Some(kv) = self.kv.take() {
            self.requants_before = self.requants_before.saturating_add(kv.requantizations());
        }
        self.spill = None;
    }

    /// Chosen to resume, its cache still on disk (the engine restores it into its share of the budget).
    pub fn restoring(&self) -> bool {
        self.kv.is_none() && self.spill.is_some()
    }

    /// Take back the part of a failed step its cache holds (the step failed for a neighbour): keep the first
    /// `len` tokens in every layer. A cache that cannot give them back exactly ends the sequence with an error
    /// rather than let it run on a state no forward pass produced.
    pub fn roll_back_to(&mut self, len: usize) {
        let Some(kv) = self.kv.as_mut() else { return };
        kv.truncate(len);
        if (0..kv.geometry().layers).any(|l| kv.len(l) != len) {
            self.finish(
                FinishReason::Error,
                Some("a step shared with a failing sequence could not be taken back from this cache".into()),
            );
        }
    }

    /// Re-quantizations over the sequence's life so far.
    pub fn requantizations(&self) -> u64 {
        self.requants_before + self.kv.as_ref().map_or(0, |k| k.requantizations())
    }

    pub fn status(&self) -> SeqStatus {
        let phase = if self.spill.is_some() {
            SeqPhase::Preempted
        } else if self.paused() {
            SeqPhase::Paused
        } else if self.prefilled < self.prompt_len() {
            SeqPhase::Prefill
        } else {
            SeqPhase::Decode
        };
        SeqStatus {
            request_id: self.req.request_id.clone(),
            phase,
            prompt_tokens: self.prompt_len(),
            prefilled_tokens: self.prefilled,
            generated_tokens: self.generated,
            priority: self.req.priority,
            kv: self.kv_state(),
        }
    }
}

/// A sequence dropped before it finished (an engine that unwinds past it) still tells its client, so no
/// accepted stream ends without a last message.
impl Drop for Sequence<'_> {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self
                .tx
                .try_send(Event::Error("the engine stopped before this request finished".into()));
        }
    }
}

impl Admission {
    /// Finish a request that never started (time limit or shutdown while queued).
    pub fn finish_queued(self, reason: FinishReason) {
        let now = Instant::now();
        let _ = self.tx.try_send(Event::Complete(Completion {
            finish: reason,
            stop_matched: None,
            usage: Usage {
                prompt_tokens: self.req.prompt_ids.len(),
                completion_tokens: 0,
                reasoning_tokens: 0,
            },
            timings: Timings {
                queue_ms: ms(self.arrived, now),
                total_ms: ms(self.arrived, now),
                ..Timings::default()
            },
            kv: KvState::default(),
            thinking_budget_reached: false,
            thinking_concluded: false,
        }));
    }

    pub fn status(&self) -> SeqStatus {
        SeqStatus {
            request_id: self.req.request_id.clone(),
            phase: SeqPhase::Queued,
            prompt_tokens: self.req.prompt_ids.len(),
            prefilled_tokens: 0,
            generated_tokens: 0,
            priority: self.req.priority,
            kv: KvState::default(),
        }
    }
}
