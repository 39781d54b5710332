//! A generation request as the engine receives it (no wire types), and its validation into a [`ValidRequest`].
//!
//! Every check names the field and the bound, so the transport can hand the message to the client unchanged.
//! Validation runs on the caller's thread (the gRPC handler), never on the engine thread: a malformed request
//! costs the engine nothing.

use super::sampler::SamplingParams;
use crate::calib::Profile;
use crate::kvcache::quant::Bits;
use crate::kvcache::{KvExtensions, KvMethod, MethodSpec};
pub use crate::model::chat::ChatMessage;
use crate::model::chat::ChatTemplate;
use crate::model::Tokenizer;
use std::sync::Arc;
use std::time::Duration;

/// Longest accepted `request_id`, in bytes.
pub const MAX_REQUEST_ID_BYTES: usize = 128;
/// Longest accepted stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;
/// Request ids are written to logs and status: printable ASCII only, so none can forge or hide a log line.
pub fn is_printable_id_char(c: char) -> bool {
    (' '..='~').contains(&c)
}

/// Priorities range over `-MAX_PRIORITY ..= MAX_PRIORITY`.
pub const MAX_PRIORITY: i32 = 100;

/// What the prompt is given as.
#[derive(Clone, Debug)]
pub enum PromptInput {
    /// Used verbatim (special tokens are recognised); BOS added when the model wants one.
    Text(String),
    /// The model's chat template is applied with a generation prompt.
    Chat(Vec<ChatMessage>),
    /// Token ids, used as given.
    Tokens(Vec<u32>),
}

/// Sampling knobs a request may set; `None` keeps the server default.
#[derive(Clone, Debug, Default)]
pub struct SamplingOverrides {
    pub temperature: Option<f32>,
    pub top_k: Option<u32>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub repeat_last_n: Option<u32>,
    pub seed: Option<u64>,
}

/// A request before validation.
#[derive(Clone, Debug)]
pub struct Request {
    /// Empty: the engine makes one.
    pub request_id: String,
    pub input: PromptInput,
    pub sampling: SamplingOverrides,
    pub max_tokens: Option<u32>,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub time_limit: Option<Duration>,
    pub ignore_eos: bool,
    pub kv_method: Option<String>,
    pub min_bits: Option<u32>,
    pub priority: Option<i32>,
    /// Attach a KV state to every this-many generated tokens; 0 = only at the end.
    pub kv_state_every: Option<u32>,
    /// Reasoning tokens before the engine closes the thinking span (models with `<think>` … `</think>`).
    pub thinking_budget: Option<u32>,
    /// The chat template's `enable_thinking` variable (Qwen3); unset leaves it undefined.
    pub enable_thinking: Option<bool>,
}

impl Request {
    /// A greedy request with server defaults for everything but the input.
    pub fn new(input: PromptInput) -> Self {
        Request {
            request_id: String::new(),
            input,
            sampling: SamplingOverrides::default(),
            max_tokens: None,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            time_limit: None,
            ignore_eos: false,
            kv_method: None,
            min_bits: None,
            priority: None,
            kv_state_every: None,
            thinking_budget: None,
            enable_thinking: None,
        }
    }
}

/// A request that passed every check, its prompt tokenized.
#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub request_id: String,
    pub prompt_ids: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub time_limit: Option<Duration>,
    pub ignore_eos: bool,
    pub kv: MethodSpec,
    pub min_bits: Bits,
    pub priority: i32,
    pub kv_state_every: usize,
    /// `Some` when the model has a thinking span.
    pub thinking: Option<super::Thinking>,
}

/// Why a request was refused. Messages name the field and the bound.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("`{field}` {reason}")]
    Invalid { field: String, reason: String },
    #[error("the queue is full ({queued} requests waiting, limit {limit}); retry later")]
    QueueFull { queued: usize, limit: usize },
    #[error("the server is {0}")]
    Unavailable(&'static str),
    #[error(
        "the request needs {need} bytes of KV cache at its floor width ({tokens} tokens: prompt plus max_tokens), \
         the KV budget is {budget} bytes; lower `stopping.max_tokens` or raise the budget"
    )]
    WontFit { need: usize, budget: usize, tokens: usize },
    /// Preparing the request failed inside the server (a bug; the request ends, the server goes on).
    #[error("internal error while preparing the request: {0}")]
    Internal(String),
}

fn invalid(field: &str, reason: impl Into<String>) -> RequestError {
    RequestError::Invalid {
        field: field.to_string(),
        reason: reason.into(),
    }
}

/// Limits and defaults requests are checked against (from the daemon's config).
#[derive(Clone, Debug)]
pub struct RequestLimits {
    pub default_max_tokens: usize,
    pub max_tokens_limit: usize,
    pub max_stop: usize,
    pub default_kv_method: KvMethod,
    pub default_kv_state_every: usize,
}

/// Everything validation needs: tokenizer, chat template, model limits, the profile's shares and key scales.
pub struct Frontend {
    pub tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub limits: RequestLimits,
    profile: Option<Arc<Profile>>,
    /// What the backend's caches take beyond the paper's method ([`crate::model::Backend::kv_extensions`]).
    kv_extensions: KvExtensions,
    /// The model's thinking-span markers, if it has them.
    pub think: Option<super::ThinkMarkers>,
}

impl Frontend {
    pub fn new(
        tokenizer: Arc<Tokenizer>,
        context_length: usize,
        vocab_size: usize,
        limits: RequestLimits,
        profile: Option<Arc<Profile>>,
        kv_extensions: KvExtensions,
    ) -> Result<Self, crate::model::ModelError> {
        let template = tokenizer.chat_template.as_deref().map(ChatTemplate::new).transpose()?;
        let think = super::ThinkMarkers::of(&tokenizer);
        Ok(Frontend {
            think,
            tokenizer,
            template,
            context_length,
            vocab_size,
            limits,
            profile,
            kv_extensions,
        })
    }

    /// Tokenize a prompt. `field` names the input in errors (`text`, `chat`, `tokens`).
    pub fn encode(&self, input: &PromptInput) -> Result<Vec<u32>, RequestError> {
        self.encode_with(input, None)
    }

    /// [`Frontend::encode`] with the chat template's `enable_thinking`.
    pub fn encode_with(&self, input: &PromptInput, enable_thinking: Option<bool>) -> Result<Vec<u32>, RequestError> {
        let tok = &self.tokenizer;
        let ids = match input {
            PromptInput::Text(t) => {
                if t.is_empty() {
                    return Err(invalid("text", "must not be empty"));
                }
                tok.encode(t, true)
                    .map_err(|e| invalid("text", format!("cannot be tokenized: {e}")))?
            }
            PromptInput::Chat(msgs) => {
                let tmpl = self
                    .template
                    .as_ref()
                    .ok_or_else(|| invalid("chat", "is not supported: the model has no chat template; send text"))?;
                if msgs.is_empty() {
                    return Err(invalid("chat.messages", "must not be empty"));
                }
                tmpl.encode_with(tok, msgs, enable_thinking).map_err(|e| match e {
                    // The template's own checks name the message (`messages[2].role must be one of …`).
                    crate::model::ModelError::Template(msg) => invalid("chat", msg),
                    e => invalid("chat", format!("cannot be tokenized: {e}")),
                })?
            }
            PromptInput::Tokens(ids) => {
                if let Some((i, &t)) = ids.iter().enumerate().find(|(_, &t)| t as usize >= self.vocab_size) {
                    return Err(invalid(
                        &format!("tokens.ids[{i}]"),
                        format!("must be < {} (the vocabulary size), got {t}", self.vocab_size),
                    ));
                }
                ids.clone()
            }
        };
        if ids.is_empty() {
            return Err(invalid(input_field(input), "must not be empty"));
        }
        // One position must stay free for the first generated token.
        if ids.len() >= self.context_length {
            return Err(invalid(
                input_field(input),
                format!(
                    "is {} tokens; the prompt must be < {} (the model's context)",
                    ids.len(),
                    self.context_length
                ),
            ));
        }
        Ok(ids)
    }

    /// Check every field and tokenize the prompt.
    pub fn validate(&self, req: Request, request_id: String) -> Result<ValidRequest, RequestError> {
        let l = &self.limits;
        if req.request_id.len() > MAX_REQUEST_ID_BYTES {
            return Err(invalid(
                "request_id",
                format!("must be <= {MAX_REQUEST_ID_BYTES} bytes, got {}", req.request_id.len()),
            ));
        }
        if let Some(c) = req.request_id.chars().find(|c| !is_printable_id_char(*c)) {
            return Err(invalid(
                "request_id",
                format!("must be printable ASCII (0x20..=0x7e), got {:?}", c),
            ));
        }
        let d = SamplingParams::default();
        let s = &req.sampling;
        let sampling = SamplingParams {
            temperature: s.temperature.unwrap_or(d.temperature),
            top_k: s.top_k.map_or(d.top_k, |k| k as usize),
            top_p: s.top_p.unwrap_or(d.top_p),
            min_p: s.min_p.unwrap_or(d.min_p),
            repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
            repeat_last_n: s.repeat_last_n.map_or(d.repeat_last_n, |n| n as usize),
            seed: s.seed.unwrap_or(d.seed),
        };
        sampling.validate().map_err(|e| {
            // SamplingError's messages already read "`top_p` must be in (0, 1], got 2".
            let text = e.to_string();
            let (field, reason) = text
                .strip_prefix('`')
                .and_then(|r| r.split_once("` "))
                .map(|(f, r)| (format!("sampling.{f}"), r.to_string()))
                .unwrap_or_else(|| ("sampling".to_string(), text.clone()));
            RequestError::Invalid { field, reason }
        })?;
        let max_tokens = match req.max_tokens {
            None => l.default_max_tokens.min(l.max_tokens_limit),
            Some(0) => return Err(invalid("stopping.max_tokens", "must be >= 1, got 0")),
            Some(n) if n as usize > l.max_tokens_limit => {
                return Err(invalid(
                    "stopping.max_tokens",
                    format!("must be <= {}, got {n}", l.max_tokens_limit),
                ))
            }
            Some(n) => n as usize,
        };
        if req.stop.len() > l.max_stop {
            return Err(invalid(
                "stopping.stop",
                format!("may hold at most {} strings, got {}", l.max_stop, req.stop.len()),
            ));
        }
        for (i, s) in req.stop.iter().enumerate() {
            if s.is_empty() || s.len() > MAX_STOP_BYTES {
                return Err(invalid(
                    &format!("stopping.stop[{i}]"),
                    format!("must be 1..={MAX_STOP_BYTES} bytes, got {}", s.len()),
                ));
            }
        }
        if req.stop_token_ids.len() > l.max_stop {
            return Err(invalid(
                "stopping.stop_token_ids",
                format!("may hold at most {} ids, got {}", l.max_stop, req.stop_token_ids.len()),
            ));
        }
        if let Some((i, &t)) = req
            .stop_token_ids
            .iter()
            .enumerate()
            .find(|(_, &t)| t as usize >= self.vocab_size)
        {
            return Err(invalid(
                &format!("stopping.stop_token_ids[{i}]"),
                format!("must be < {} (the vocabulary size), got {t}", self.vocab_size),
            ));
        }
        if req.time_limit == Some(Duration::ZERO) {
            return Err(invalid("stopping.time_limit_ms", "must be >= 1, got 0"));
        }
        let method = match &req.kv_method {
            None => l.default_kv_method.clone(),
            Some(m) => m
                .parse::<KvMethod>()
                .map_err(|e: crate::kvcache::method::BadMethod| invalid("kv.method", e.to_string()))?,
        };
        let min_bits = match req.min_bits {
            None => Bits::B2,
            Some(b) => {
                Bits::from_count(b).ok_or_else(|| invalid("kv.min_bits", format!("must be 2, 4, 8 or 16, got {b}")))?
            }
        };
        let priority = req.priority.unwrap_or(0);
        // a range check, not `abs()`: `i32::MIN.abs()` overflows (wrapping to a negative that passed)
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            return Err(invalid(
                "kv.priority",
                format!("must be in -{MAX_PRIORITY}..={MAX_PRIORITY}, got {priority}"),
            ));
        }
        if self.think.is_none() {
            if let Some(b) = req.thinking_budget {
                return Err(invalid(
                    "thinking_budget",
                    format!("needs a model with a thinking span (`<think>` … `</think>` tokens); this one has none, got {b}"),
                ));
            }
        }
        let prompt_ids = self.encode_with(&req.input, req.enable_thinking)?;
        let thinking = self.think.clone().map(|markers| super::Thinking {
            open_in_prompt: markers.open_after(&prompt_ids),
            markers,
            budget: req.thinking_budget.map(|b| b as usize),
        });
        // The request's own floor: the memory policy never lowers it below `min_bits`.
        let method = match method {
            KvMethod::Pmkvq(mut c) if min_bits.count() > c.floor_bits.count() => {
                c.floor_bits = min_bits;
                KvMethod::Pmkvq(c)
            }
            m => m,
        };
        let kv = self.method_spec(method);
        Ok(ValidRequest {
            request_id,
            prompt_ids,
            sampling,
            max_tokens,
            stop: req.stop,
            stop_token_ids: req.stop_token_ids,
            time_limit: req.time_limit,
            ignore_eos: req.ignore_eos,
            kv,
            min_bits,
            priority,
            kv_state_every: req.kv_state_every.map_or(l.default_kv_state_every, |n| n as usize),
            thinking,
        })
    }

    /// The store configuration for a method: PM-KVQ takes the profile's shares and key scales.
    pub fn method_spec(&self, method: KvMethod) -> MethodSpec {
        crate::calib::method_spec(method, self.profile.as_deref(), self.kv_extensions)
    }
}

fn input_field(input: &PromptInput) -> &'static str {
    match input {
        PromptInput::Text(_) => "text",
        PromptInput::Chat(_) => "chat",
        PromptInput::Tokens(_) => "tokens.ids",
    }
}
