//! OpenAI's response objects: a whole `chat.completion` / `text_completion`, streamed chunks, the usage chunk,
//! and the `pmkvq` extension object (exact finish reason, KV state, timings) on the last of them.

use crate::engine::{Completion, FinishReason, KvState};
use serde_json::{json, Value};

/// OpenAI's finish reason: `stop` for an end the model or a stop string chose, `length` for every limit (tokens,
/// context, memory, time) and for a cut; the exact reason is in the `pmkvq` extension object.
pub fn finish_reason(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length
        | FinishReason::ContextLimit
        | FinishReason::MemoryPressure
        | FinishReason::TimeLimit
        | FinishReason::Cancelled
        | FinishReason::Error => "length",
    }
}

pub fn usage(c: &Completion) -> Value {
    json!({
        "prompt_tokens": c.usage.prompt_tokens,
        "completion_tokens": c.usage.completion_tokens,
        "total_tokens": c.usage.prompt_tokens + c.usage.completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": c.usage.reasoning_tokens},
    })
}

fn kv(k: &KvState) -> Value {
    json!({
        "method": k.method,
        "tokens": k.tokens,
        "true_bytes": k.true_bytes,
        "layer_bits": k.layer_bits,
    })
}

/// The `pmkvq` extension object on a finished completion: the exact finish reason, the stop that matched, the
/// KV cache's final state and the timings (clients that do not know it ignore it).
pub fn extension(c: &Completion) -> Value {
    json!({
        "finish_reason": format!("{:?}", c.finish).to_lowercase(),
        "thinking_budget_reached": c.thinking_budget_reached,
        "thinking_concluded": c.thinking_concluded,
        "stop_matched": c.stop_matched,
        "kv": kv(&c.kv),
        "timings": {
            "queue_ms": c.timings.queue_ms,
            "prefill_ms": c.timings.prefill_ms,
            "decode_ms": c.timings.decode_ms,
            "ttft_ms": c.timings.ttft_ms,
            "total_ms": c.timings.total_ms,
        },
    })
}

/// Which endpoint a response belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Chat,
    Text,
}

/// Response ids, objects and the shapes of one choice.
#[derive(Clone)]
pub struct Shape {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    /// `stream_options.include_usage`: chunks carry `"usage": null`, and a usage chunk ends the stream.
    pub include_usage: bool,
}

impl Shape {
    pub fn new(kind: Kind, request_id: &str, model: String, include_usage: bool) -> Self {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let prefix = match kind {
            Kind::Chat => "chatcmpl-",
            Kind::Text => "cmpl-",
        };
        Shape {
            kind,
            id: format!("{prefix}{request_id}"),
            model,
            created,
            include_usage,
        }
    }

    /// The object around the choices: id, object, created, model (and, on a chunk with usage asked for,
    /// `"usage": null`, OpenAI's convention).
    fn envelope(&self, chunk: bool, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        });
        if chunk && self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Text, _) => "text_completion",
        }
    }

    /// The whole (non-streamed) response; `reasoning` (the text inside thinking spans) goes to
    /// `reasoning_content`, as vLLM and DeepSeek's API put it.
    pub fn complete(&self, text: String, reasoning: String, c: &Completion) -> Value {
        let reasoning = (!reasoning.is_empty()).then_some(reasoning);
        let mut choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason(c.finish),
            }),
            Kind::Text => json!({
                "index": 0,
                "text": text,
                "logprobs": null,
                "finish_reason": finish_reason(c.finish),
            }),
        };
        if let Some(r) = reasoning {
            match self.kind {
                Kind::Chat => choice["message"]["reasoning_content"] = r.into(),
                Kind::Text => choice["reasoning_content"] = r.into(),
            }
        }
        let mut v = self.envelope(false, json!([choice]));
        v["usage"] = usage(c);
        v["pmkvq"] = extension(c);
        v
    }

    /// One streamed chunk with a choice: `text` (a first chat chunk also says the role) and, on the last, the
    /// finish reason and our extension.
    pub fn chunk(&self, text: &str, first: bool, done: Option<&Completion>) -> Value {
        let finish = done.map(|c| finish_reason(c.finish));
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match (first, done) {
                    (true, _) => json!({"role": "assistant", "content": text}),
                    (false, Some(_)) if text.is_empty() => json!({}),
                    (false, _) => json!({"content": text}),
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
            }
            Kind::Text => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        let mut v = self.envelope(true, json!([choice]));
        if let Some(c) = done {
            v["pmkvq"] = extension(c);
        }
        v
    }

    /// A streamed chunk of reasoning: `delta.reasoning_content` (chat) or `reasoning_content` beside an empty
    /// `text` (completions).
    pub fn reasoning_chunk(&self, text: &str) -> Value {
        let mut v = self.chunk("", false, None);
        match self.kind {
            Kind::Chat => v["choices"][0]["delta"] = json!({"reasoning_content": text}),
            Kind::Text => v["choices"][0]["reasoning_content"] = text.into(),
        }
        v
    }

    /// The usage-only chunk after the last choice (`stream_options.include_usage`).
    pub fn usage_chunk(&self, c: &Completion) -> Value {
        let mut v = self.envelope(true, json!([]));
        v["usage"] = usage(c);
        v
    }
}
