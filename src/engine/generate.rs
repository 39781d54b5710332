//! The CLI's local generation: one [`Sequence`] — the daemon's own token loop (sampling, EOS, stop strings and
//! stop tokens, length and context limits, detokenizing) — driven by a batch of one. `pmkvq generate` and the
//! evaluation tools use it, so the CLI and the daemon cannot drift apart on what a token means.

use super::budget;
use super::events::Event;
use super::request::ValidRequest;
use super::sampler::{Sampler, SamplingError, SamplingParams};
use super::sequence::{Admission, Sequence};
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvError, KvMethod, KvStore, MethodSpec};
use crate::model::{Backend, LogitsMode, ModelError, Tokenizer};
use serde::Serialize;
use std::time::{Duration, Instant};

/// Events one local step can produce (a chunk, the held-back text at the end, the completion), with room to
/// spare: the loop takes them after every step, so the sequence never pauses.
const LOCAL_EVENTS: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced an end-of-sequence token.
    Eos,
    /// A stop string was produced.
    Stop,
    /// The model's context window is full.
    ContextLimit,
    /// The KV budget cannot hold another token even at the lowest precision.
    MemoryPressure,
    /// The client went away or the daemon shut down before the sequence finished.
    Cancelled,
    /// The request's time limit passed.
    TimeLimit,
    /// The engine failed this sequence.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::ContextLimit => "context_limit",
            FinishReason::MemoryPressure => "memory_pressure",
            FinishReason::Cancelled => "cancelled",
            FinishReason::TimeLimit => "time_limit",
            FinishReason::Error => "error",
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenerateRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    /// Tokens per prefill forward pass.
    pub prefill_chunk: usize,
}

impl GenerateRequest {
    /// The daemon's request for the same generation. `kv` describes the caller's store for reports only: the
    /// local loop runs over that store and never creates, spills or restores one from the spec.
    fn valid(&self, kv: MethodSpec) -> ValidRequest {
        ValidRequest {
            request_id: "local".into(),
            prompt_ids: self.prompt_ids.clone(),
            sampling: self.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: self.stop.clone(),
            stop_token_ids: Vec::new(),
            time_limit: None,
            ignore_eos: false,
            kv,
            min_bits: Bits::B2,
            priority: 0,
            kv_state_every: 0,
            thinking: None,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GenerateOutput {
    pub prompt_ids: Vec<u32>,
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// KV method, bytes held at the end (true and codes-only) and each layer's width.
    pub kv_method: String,
    pub kv_true_bytes: usize,
    pub kv_payload_bytes: usize,
    pub kv_bits: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("`prompt` must not be empty")]
    EmptyPrompt,
    #[error("`prompt` has {got} tokens, the context holds {limit}")]
    PromptTooLong { got: usize, limit: usize },
    #[error("`max_tokens` must be >= 1, got 0")]
    NoTokens,
    #[error("the sequence failed: {0}")]
    Failed(String),
}

fn per_s(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// Generate, calling `on_text` with each piece of text as soon as it is final, and `on_step` after every forward
/// pass (prefill included) with the KV store (for traces and checks). A refusal by the store during the prompt is
/// an error; during decoding it ends the sequence with [`FinishReason::MemoryPressure`], its text so far intact.
pub fn generate(
    model: &dyn Backend,
    tok: &Tokenizer,
    kv: &mut dyn KvStore,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
    mut on_step: impl FnMut(&dyn KvStore),
) -> Result<GenerateOutput, GenerateError> {
    let ctx = model.config().context_length;
    if req.prompt_ids.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if req.prompt_ids.len() + kv.len(0) >= ctx {
        return Err(GenerateError::PromptTooLong {
            got: req.prompt_ids.len(),
            limit: ctx,
        });
    }
    if req.max_tokens == 0 {
        return Err(GenerateError::NoTokens);
    }
    let sampler = Sampler::new(req.sampling.clone())?;
    let method = kv.method();
    let spec = MethodSpec::plain(KvMethod::Fp16, None, &method);
    let (tx, mut rx) = tokio::sync::mpsc::channel(LOCAL_EVENTS);
    let t0 = Instant::now();
    let admission = Admission {
        req: req.valid(spec),
        tx,
        arrived: t0,
    };
    let max_len = budget::max_len(req.prompt_ids.len(), req.max_tokens, ctx);
    let mut seq = Sequence::new(admission, Box::new(&mut *kv), sampler, max_len);
    let chunk = req.prefill_chunk.max(1);
    let (mut ids, mut text) = (Vec::new(), String::new());
    let mut finish = None;
    let mut prefill = None;
    while let Some((tokens, positions)) = seq.next_input(chunk) {
        let prefilling = seq.prefilled < seq.prompt_len();
        // logits only where a token is sampled: the prompt's last chunk, every decode step
        let mode = if prefilling && seq.prefilled + tokens.len() < seq.prompt_len() {
            LogitsMode::None
        } else {
            LogitsMode::Last
        };
        let Some(store) = seq.kv.as_deref_mut() else { break };
        match model.forward_one(&tokens, &positions, store, mode) {
            Ok(mut l) => {
                on_step(seq.kv.as_deref().expect("held until the sequence finishes"));
                if let Some(reason) = seq.on_logits(tokens.len(), &mut l, tok, ctx) {
                    seq.finish(reason, None);
                }
            }
            // refused before any layer changed: the sequence ends here, its text so far intact (spec §3.7)
            Err(ModelError::Kv(KvError::OutOfBudget { .. })) if !prefilling => {
                seq.finish(FinishReason::MemoryPressure, None)
            }
            Err(e) => return Err(e.into()),
        }
        if prefill.is_none() && seq.prefilled >= seq.prompt_len() {
            prefill = Some(t0.elapsed());
        }
        take_events(&mut seq, &mut rx, &mut |ev| match ev {
            Event::Chunk {
                text: piece, token_ids, ..
            } => {
                on_text(&piece);
                text.push_str(&piece);
                ids.extend(token_ids);
            }
            Event::Complete(c) => finish = Some(Ok(c.finish)),
            Event::Error(msg) => finish = Some(Err(msg)),
        });
    }
    drop(seq);
    let finish = match finish {
        Some(Ok(f)) => f,
        Some(Err(msg)) => return Err(GenerateError::Failed(msg)),
        None => return Err(GenerateError::Failed("the sequence stopped without finishing".into())),
    };
    let prefill = prefill.unwrap_or_else(|| t0.elapsed());
    let decode = t0.elapsed().saturating_sub(prefill);
    // The first token comes from the prefill's logits: decode throughput counts the forward passes it ran.
    let decode_steps = ids.len().saturating_sub(1);
    Ok(GenerateOutput {
        prompt_ids: req.prompt_ids.clone(),
        ids,
        text,
        finish_reason: finish,
        prompt_tokens_per_s: per_s(req.prompt_ids.len(), prefill),
        decode_tokens_per_s: per_s(decode_steps, decode),
        prefill_ms: prefill.as_secs_f64() * 1e3,
        decode_ms: decode.as_secs_f64() * 1e3,
        kv_method: method,
        kv_true_bytes: kv.true_bytes(),
        kv_payload_bytes: kv.payload_bytes(),
        kv_bits: kv.layer_bits(),
    })
}

/// Hand every event the sequence has produced to `f`, moving held ones into the channel as it empties.
fn take_events(seq: &mut Sequence<'_>, rx: &mut tokio::sync::mpsc::Receiver<Event>, f: &mut impl FnMut(Event)) {
    loop {
        while let Ok(ev) = rx.try_recv() {
            f(ev);
        }
        seq.flush();
        if seq.drained() && rx.is_empty() {
            return;
        }
    }
}
