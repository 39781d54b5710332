//! One sequence, start to finish: chunked prefill, then sample → decode step → detokenize → stop checks.
//! The CLI's `generate` and the evaluation tools use this; the daemon's batched scheduler reuses its parts.

use super::detok::Detokenizer;
use super::sampler::{Sampler, SamplingError, SamplingParams};
use super::stop::StopChecker;
use crate::kvcache::{KvError, KvStore};
use crate::model::{LogitsMode, Model, ModelError, SeqInput, Tokenizer};
use serde::Serialize;
use std::time::{Duration, Instant};

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
    KvBudget,
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
            FinishReason::KvBudget => "memory_pressure",
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
}

fn per_s(n: usize, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

/// Generate, calling `on_text` with each piece of text as soon as it is final, and `on_step` after every forward
/// pass (prefill included) with the number of tokens stored and the KV store (for traces and checks).
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    kv: &mut dyn KvStore,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str),
    mut on_step: impl FnMut(&dyn KvStore),
) -> Result<GenerateOutput, GenerateError> {
    let ctx = model.config.context_length;
    if req.prompt_ids.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if req.prompt_ids.len() + kv.len(0) >= ctx {
        return Err(GenerateError::PromptTooLong {
            got: req.prompt_ids.len(),
            limit: ctx,
        });
    }
    let mut sampler = Sampler::new(req.sampling.clone())?;
    let t0 = Instant::now();
    let mut logits = model.forward_chunked(&req.prompt_ids, kv, req.prefill_chunk, LogitsMode::Last)?;
    let prefill = t0.elapsed();
    on_step(kv);

    let mut history = req.prompt_ids.clone();
    let mut ids = Vec::new();
    let mut detok = Detokenizer::new();
    let mut stops = StopChecker::new(req.stop.clone());
    let mut text = String::new();
    let t1 = Instant::now();
    let finish = loop {
        if ids.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        let next = sampler.sample(&mut logits, &history);
        ids.push(next);
        history.push(next);
        if tok.is_eos(next) {
            break FinishReason::Eos;
        }
        let piece = detok.push(tok.token_bytes(next, false));
        let fed = stops.feed(&piece);
        on_text(&fed.emit);
        text.push_str(&fed.emit);
        if fed.matched.is_some() {
            break FinishReason::Stop;
        }
        if ids.len() >= req.max_tokens {
            break FinishReason::Length;
        }
        let pos = kv.len(0) as u32;
        if pos as usize + 1 >= ctx {
            break FinishReason::ContextLimit;
        }
        let step = [SeqInput {
            tokens: &[next],
            positions: &[pos],
        }];
        match model.forward(&step, &mut [&mut *kv], LogitsMode::Last) {
            Ok(mut out) => logits = out.pop().unwrap_or_default(),
            // refused before any layer changed: the sequence ends here, its text so far intact (spec §3.7)
            Err(ModelError::Kv(KvError::OutOfBudget { .. })) => break FinishReason::KvBudget,
            Err(e) => return Err(e.into()),
        }
        on_step(kv);
    };
    if finish != FinishReason::Stop {
        let rest = stops.feed(&detok.finish()).emit + &stops.finish();
        on_text(&rest);
        text.push_str(&rest);
    }
    let decode = t1.elapsed();
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
        kv_method: kv.method(),
        kv_true_bytes: kv.true_bytes(),
        kv_payload_bytes: kv.payload_bytes(),
        kv_bits: kv.layer_bits(),
    })
}
