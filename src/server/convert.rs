//! Wire ⇄ engine: every conversion between `pmkvq.v1` messages and engine types, and the one place engine
//! errors become gRPC statuses.

use super::proto as pb;
use crate::engine::{
    ChatMessage, Completion, EngineStatus, Event, FinishReason, KvState, ModelSummary, PromptInput, Request,
    RequestError, SamplingOverrides, SeqPhase, SeqStatus,
};
use crate::memory::{Budget, BudgetSource};
use std::time::Duration;
use tonic::Status;

/// The one mapping from engine errors to gRPC status codes.
pub fn status_of(e: &RequestError) -> Status {
    match e {
        RequestError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        RequestError::QueueFull { .. } | RequestError::WontFit { .. } => Status::resource_exhausted(e.to_string()),
        RequestError::Unavailable(_) => Status::unavailable(e.to_string()),
        RequestError::Internal(_) => Status::internal(e.to_string()),
    }
}

fn missing(field: &str) -> Status {
    Status::invalid_argument(format!("`{field}` is required"))
}

fn chat(c: pb::ChatInput) -> Vec<ChatMessage> {
    c.messages
        .into_iter()
        .map(|m| ChatMessage {
            role: m.role,
            content: m.content,
        })
        .collect()
}

pub fn prompt_of_generate(input: Option<pb::generate_request::Input>) -> Result<PromptInput, Status> {
    use pb::generate_request::Input;
    match input {
        Some(Input::Text(t)) => Ok(PromptInput::Text(t)),
        Some(Input::Chat(c)) => Ok(PromptInput::Chat(chat(c))),
        Some(Input::Tokens(t)) => Ok(PromptInput::Tokens(t.ids)),
        None => Err(missing("input (one of text, chat, tokens)")),
    }
}

pub fn prompt_of_tokenize(input: Option<pb::tokenize_request::Input>) -> Result<PromptInput, Status> {
    use pb::tokenize_request::Input;
    match input {
        Some(Input::Text(t)) => Ok(PromptInput::Text(t)),
        Some(Input::Chat(c)) => Ok(PromptInput::Chat(chat(c))),
        None => Err(missing("input (one of text, chat)")),
    }
}

pub fn request_of(r: pb::GenerateRequest) -> Result<Request, Status> {
    let s = r.sampling.unwrap_or_default();
    let stop = r.stopping.unwrap_or_default();
    let kv = r.kv.unwrap_or_default();
    Ok(Request {
        request_id: r.request_id,
        input: prompt_of_generate(r.input)?,
        sampling: SamplingOverrides {
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: s.top_p,
            min_p: s.min_p,
            repetition_penalty: s.repetition_penalty,
            repeat_last_n: s.repeat_last_n,
            seed: s.seed,
        },
        max_tokens: stop.max_tokens,
        stop: stop.stop,
        stop_token_ids: stop.stop_token_ids,
        time_limit: stop.time_limit_ms.map(|ms| Duration::from_millis(ms as u64)),
        ignore_eos: stop.ignore_eos.unwrap_or(false),
        kv_method: kv.method,
        min_bits: kv.min_bits,
        priority: kv.priority,
        kv_state_every: r.kv_state_every,
        thinking_budget: r.thinking_budget,
        enable_thinking: r.enable_thinking,
    })
}

pub fn kv_state(k: &KvState) -> pb::KvState {
    pb::KvState {
        tokens: k.tokens as u32,
        true_bytes: k.true_bytes as u64,
        layer_bits: k.layer_bits.clone(),
        method: k.method.clone(),
    }
}

pub fn finish_reason(f: FinishReason) -> pb::FinishReason {
    match f {
        FinishReason::Length => pb::FinishReason::Length,
        FinishReason::Eos => pb::FinishReason::Eos,
        FinishReason::Stop => pb::FinishReason::Stop,
        FinishReason::ContextLimit => pb::FinishReason::ContextLimit,
        FinishReason::MemoryPressure => pb::FinishReason::MemoryPressure,
        FinishReason::Cancelled => pb::FinishReason::Cancelled,
        FinishReason::TimeLimit => pb::FinishReason::TimeLimit,
        FinishReason::Error => pb::FinishReason::Error,
    }
}

fn complete(c: &Completion) -> pb::Complete {
    pb::Complete {
        finish_reason: finish_reason(c.finish) as i32,
        stop_matched: c.stop_matched.clone().unwrap_or_default(),
        usage: Some(pb::Usage {
            prompt_tokens: c.usage.prompt_tokens as u32,
            completion_tokens: c.usage.completion_tokens as u32,
            reasoning_tokens: c.usage.reasoning_tokens as u32,
        }),
        timings: Some(pb::Timings {
            queue_ms: c.timings.queue_ms,
            prefill_ms: c.timings.prefill_ms,
            decode_ms: c.timings.decode_ms,
            ttft_ms: c.timings.ttft_ms,
            total_ms: c.timings.total_ms,
        }),
        kv: Some(kv_state(&c.kv)),
        thinking_budget_reached: c.thinking_budget_reached,
        thinking_concluded: c.thinking_concluded,
    }
}

pub fn response_of(request_id: &str, ev: &Event) -> pb::GenerateResponse {
    use pb::generate_response::Kind;
    let kind = match ev {
        Event::Chunk {
            text,
            token_ids,
            kv,
            reasoning,
        } => Kind::Chunk(pb::Chunk {
            text: text.clone(),
            token_ids: token_ids.clone(),
            kv: kv.as_ref().map(kv_state),
            reasoning: *reasoning,
        }),
        Event::Complete(c) => Kind::Complete(complete(c)),
        Event::Error(m) => Kind::Error(pb::Error { message: m.clone() }),
    };
    pb::GenerateResponse {
        request_id: request_id.to_string(),
        kind: Some(kind),
    }
}

pub fn model_info(m: &ModelSummary) -> pb::ModelInfo {
    pb::ModelInfo {
        name: m.name.clone(),
        architecture: m.architecture.clone(),
        path: m.path.display().to_string(),
        sha256: m.sha256.clone(),
        layers: m.layers as u32,
        heads: m.heads as u32,
        kv_heads: m.kv_heads as u32,
        head_dim: m.head_dim as u32,
        context_length: m.context_length as u32,
        vocab_size: m.vocab_size as u32,
        weight_bytes: m.weight_bytes as u64,
        device: m.device.clone(),
        device_weight_bytes: m.device_weight_bytes as u64,
        kv_bytes_per_token: m
            .kv_bytes_per_token
            .iter()
            .map(|&(bits, bytes)| pb::KvBytesPerToken {
                bits,
                bytes: bytes as u64,
            })
            .collect(),
        profile: m.profile.as_ref().map(|p| pb::ProfileInfo {
            path: p.path.display().to_string(),
            avg_bits: p.avg_bits,
            layer_shares: p.layer_shares.clone(),
            layer_bits: p.layer_bits.clone(),
        }),
        default_kv_method: m.default_kv_method.clone(),
        max_tokens_limit: m.max_tokens_limit as u32,
    }
}

fn phase(p: SeqPhase) -> pb::SequenceState {
    match p {
        SeqPhase::Queued => pb::SequenceState::Queued,
        SeqPhase::Prefill => pb::SequenceState::Prefill,
        SeqPhase::Decode => pb::SequenceState::Decode,
        SeqPhase::Paused => pb::SequenceState::Paused,
        SeqPhase::Preempted => pb::SequenceState::Preempted,
    }
}

fn sequence(s: &SeqStatus) -> pb::SequenceStatus {
    pb::SequenceStatus {
        request_id: s.request_id.clone(),
        state: phase(s.phase) as i32,
        prompt_tokens: s.prompt_tokens as u32,
        prefilled_tokens: s.prefilled_tokens as u32,
        generated_tokens: s.generated_tokens as u32,
        priority: s.priority,
        kv: Some(kv_state(&s.kv)),
    }
}

pub fn server_status(s: &EngineStatus, draining: bool) -> pb::ServerStatus {
    pb::ServerStatus {
        ready: s.ready && !s.stopped,
        draining: draining || s.draining,
        running: s.running() as u32,
        queued: s.queued() as u32,
        sequences: s.sequences.iter().map(sequence).collect(),
        kv_true_bytes: s.kv_true_bytes as u64,
        steps: s.steps,
        uptime_s: s.started.elapsed().as_secs_f64(),
        completed_requests: s.completed,
        generated_tokens: s.generated_tokens,
        kv_budget_bytes: s.budget_bytes as u64,
        budget_source: budget_source(s.budget_source) as i32,
        preemptions: s.preemptions,
        resumptions: s.resumptions,
        requantizations: s.requantizations,
    }
}

pub fn budget_source(s: BudgetSource) -> pb::BudgetSource {
    match s {
        BudgetSource::Operator => pb::BudgetSource::Operator,
        BudgetSource::Host => pb::BudgetSource::Host,
        BudgetSource::Cgroup => pb::BudgetSource::Cgroup,
        BudgetSource::Device => pb::BudgetSource::Device,
        BudgetSource::Pressure => pb::BudgetSource::Pressure,
    }
}

pub fn memory_info(b: &Budget) -> pb::MemoryInfo {
    let m = &b.sample;
    pb::MemoryInfo {
        host_total: m.host_total,
        host_available: m.host_available,
        cgroup_max: m.cgroup_max,
        cgroup_high: m.cgroup_high,
        cgroup_current: m.cgroup_current,
        psi_some_avg10: m.psi_some_avg10,
        psi_full_avg10: m.psi_full_avg10,
        device_total: m.device.map(|d| d.total),
        device_free: m.device.map(|d| d.free),
        tegra: m.tegra,
    }
}
