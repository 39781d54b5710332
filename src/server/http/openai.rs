//! OpenAI's request bodies → engine requests: which fields are served, which are accepted and ignored, which are
//! refused (each with a 400 that names it). The responses are in [`super::shape`].
//!
//! The table in README.md ("OpenAI-compatible HTTP") lists the same fields; `tests/http_openai.rs` checks both
//! directions with the official client.

use super::error::ApiError;
use crate::engine::{ChatMessage, PromptInput, Request, SamplingOverrides};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

/// Fields both endpoints take ([`Common`]).
const COMMON_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "user",
    "logit_bias",
    "top_k",
    "min_p",
    "repetition_penalty",
    "ignore_eos",
    "kv_method",
    "kv_min_bits",
    "priority",
    "thinking_budget",
];
/// Fields only `/v1/chat/completions` takes ([`ChatOnly`]).
const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "enable_thinking",
    "chat_template_kwargs",
];
/// Fields only `/v1/completions` takes ([`CompletionOnly`]).
const COMPLETION_FIELDS: &[&str] = &["prompt", "echo", "suffix", "best_of", "logprobs"];

/// `body` as a JSON object whose every field is one of `allowed` (OpenAI itself refuses unknown arguments; a
/// typo such as `max_token` must not be ignored silently).
fn object(body: &[u8], allowed: &[&[&str]]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(None, format!("the body is not valid JSON: {e}")))?;
    let Some(obj) = v.as_object() else {
        return Err(ApiError::bad_request(None, "the body must be a JSON object"));
    };
    if let Some(k) = obj.keys().find(|k| !allowed.iter().any(|a| a.contains(&k.as_str()))) {
        return Err(refuse(
            k,
            format!("`{k}` is not a field this server knows (unrecognized request argument; see the README's table)"),
        ));
    }
    Ok(v)
}

/// `v` as `T`; a type error names the field's path (`messages[1].content: invalid type …`).
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(None, e.inner().to_string())
        } else {
            let msg = format!("`{path}`: {}", e.inner());
            ApiError::bad_request(Some(&path), msg)
        }
    })
}

/// A `/v1/chat/completions` body.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v = object(body, &[COMMON_FIELDS, CHAT_FIELDS])?;
    Ok(ChatRequest {
        chat: typed(&v)?,
        common: typed(&v)?,
    })
}

/// A `/v1/completions` body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let v = object(body, &[COMMON_FIELDS, COMPLETION_FIELDS])?;
    Ok(CompletionRequest {
        text: typed(&v)?,
        common: typed(&v)?,
    })
}

/// `stop`: one string or a list.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

/// `seed`: OpenAI documents an integer; negative ones are taken as their two's complement.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Seed {
    Unsigned(u64),
    Signed(i64),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamOptions {
    pub include_usage: Option<bool>,
    /// Accepted; usage chunks carry no obfuscation padding here.
    #[serde(default)]
    pub include_obfuscation: Option<bool>,
}

/// What both endpoints share: sampling, stopping, streaming and our KV extensions.
#[derive(Deserialize, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub seed: Option<Seed>,
    pub stop: Option<Stop>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<u32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    /// Accepted and ignored: OpenAI's end-user id for abuse tracking.
    pub user: Option<String>,
    pub logit_bias: Option<serde_json::Map<String, Value>>,
    // Extensions (llama-server and vLLM accept the sampling ones under these names too).
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub repetition_penalty: Option<f32>,
    pub ignore_eos: Option<bool>,
    pub kv_method: Option<String>,
    pub kv_min_bits: Option<u32>,
    pub priority: Option<i32>,
    /// Reasoning tokens before the engine closes the thinking span.
    pub thinking_budget: Option<u32>,
}

pub struct ChatRequest {
    pub chat: ChatOnly,
    pub common: Common,
}

#[derive(Deserialize)]
pub struct ChatOnly {
    pub messages: Vec<MessageIn>,
    pub max_completion_tokens: Option<u32>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub response_format: Option<Value>,
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<Value>,
    /// Accepted and ignored (no tools are served).
    pub parallel_tool_calls: Option<bool>,
    /// The chat template's `enable_thinking` (Qwen3).
    pub enable_thinking: Option<bool>,
    /// vLLM's way to pass template variables; `enable_thinking` is the one served.
    pub chat_template_kwargs: Option<TemplateKwargs>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct TemplateKwargs {
    pub enable_thinking: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Option<Content>,
    /// Accepted and ignored (a participant's name).
    pub name: Option<String>,
    pub tool_calls: Option<Vec<Value>>,
    pub tool_call_id: Option<String>,
}

/// A message's content: a string, or a list of parts of which only text is served.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
pub struct Part {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

pub struct CompletionRequest {
    pub text: CompletionOnly,
    pub common: Common,
}

#[derive(Deserialize)]
pub struct CompletionOnly {
    pub prompt: Option<Prompt>,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<u32>,
    pub logprobs: Option<u32>,
}

/// `prompt`: a string, a list with one string, token ids, or a list with one list of token ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

/// How the response is sent.
#[derive(Clone, Copy, Debug)]
pub struct Delivery {
    pub stream: bool,
    pub include_usage: bool,
}

fn refuse(param: &str, msg: impl Into<String>) -> ApiError {
    ApiError::bad_request(Some(param), msg)
}

fn not_supported(param: &str, hint: &str) -> ApiError {
    refuse(param, format!("`{param}` is not supported by this server{hint}"))
}

/// Everything in [`Common`] that is not the prompt → the engine request, after refusing what we do not serve.
fn common_request(c: Common, input: PromptInput, max_tokens: Option<u32>) -> Result<(Request, Delivery), ApiError> {
    match c.n {
        None | Some(1) => {}
        Some(n) => return Err(refuse("n", format!("`n` must be 1 (one choice per request), got {n}"))),
    }
    for (param, v) in [
        ("presence_penalty", c.presence_penalty),
        ("frequency_penalty", c.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(not_supported(param, " (only 0); use `repetition_penalty`"));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
        return Err(not_supported("logit_bias", ""));
    }
    let stream = c.stream.unwrap_or(false);
    let opts = c.stream_options.unwrap_or_default();
    if !stream && opts.include_usage.is_some() {
        return Err(refuse(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    let stop = match c.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    let seed = c.seed.map(|s| match s {
        Seed::Unsigned(u) => u,
        Seed::Signed(i) => i as u64,
    });
    let mut r = Request::new(input);
    r.sampling = SamplingOverrides {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        min_p: c.min_p,
        repetition_penalty: c.repetition_penalty,
        repeat_last_n: None,
        seed,
    };
    r.max_tokens = max_tokens.or(c.max_tokens);
    r.stop = stop;
    r.ignore_eos = c.ignore_eos.unwrap_or(false);
    r.kv_method = c.kv_method;
    r.min_bits = c.kv_min_bits;
    r.priority = c.priority;
    r.thinking_budget = c.thinking_budget;
    // Token chunks ride on SSE without KV states; the final object carries one.
    r.kv_state_every = Some(0);
    Ok((
        r,
        Delivery {
            stream,
            include_usage: stream && opts.include_usage.unwrap_or(false),
        },
    ))
}

/// The role as our chat templates know it (`developer` is OpenAI's newer name for `system`).
fn role(r: &str) -> &str {
    match r {
        "developer" => "system",
        r => r,
    }
}

impl ChatRequest {
    pub fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }

    pub fn into_request(self) -> Result<(Request, Delivery), ApiError> {
        let ChatRequest { chat: c, common } = self;
        if c.logprobs == Some(true) || c.top_logprobs.is_some_and(|n| n > 0) {
            return Err(not_supported("logprobs", ""));
        }
        if let Some(f) = &c.response_format {
            if f.get("type").and_then(Value::as_str) != Some("text") {
                return Err(not_supported("response_format", " (only {\"type\": \"text\"})"));
            }
        }
        if c.tools.as_ref().is_some_and(|t| !t.is_empty()) {
            return Err(not_supported("tools", ""));
        }
        if c.tool_choice.as_ref().is_some_and(|t| !t.is_null() && t != "none") {
            return Err(not_supported("tool_choice", " (only \"none\")"));
        }
        if c.messages.is_empty() {
            return Err(refuse("messages", "`messages` must not be empty"));
        }
        let mut msgs = Vec::with_capacity(c.messages.len());
        for (i, m) in c.messages.into_iter().enumerate() {
            if m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) {
                return Err(not_supported(&format!("messages[{i}].tool_calls"), ""));
            }
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for (j, p) in parts.into_iter().enumerate() {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(t)) => text.push_str(&t),
                            ("text", None) => {
                                return Err(refuse(
                                    &format!("messages[{i}].content[{j}].text"),
                                    format!("`messages[{i}].content[{j}].text` is required for a text part"),
                                ))
                            }
                            (kind, _) => {
                                return Err(refuse(
                                    &format!("messages[{i}].content[{j}].type"),
                                    format!(
                                        "`messages[{i}].content[{j}].type` must be \"text\" (this model reads text \
                                         only), got {kind:?}"
                                    ),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            msgs.push(ChatMessage {
                role: role(&m.role).to_string(),
                content,
            });
        }
        let enable_thinking = c
            .enable_thinking
            .or(c.chat_template_kwargs.and_then(|k| k.enable_thinking));
        let (mut r, d) = common_request(common, PromptInput::Chat(msgs), c.max_completion_tokens)?;
        r.enable_thinking = enable_thinking;
        Ok((r, d))
    }
}

impl CompletionRequest {
    pub fn model(&self) -> Option<&str> {
        self.common.model.as_deref()
    }

    pub fn into_request(self) -> Result<(Request, Delivery), ApiError> {
        let CompletionRequest { text: t, common } = self;
        if t.echo == Some(true) {
            return Err(not_supported("echo", ""));
        }
        if t.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(not_supported("suffix", ""));
        }
        match t.best_of {
            None | Some(1) => {}
            Some(n) => return Err(refuse("best_of", format!("`best_of` must be 1, got {n}"))),
        }
        if t.logprobs.is_some_and(|n| n > 0) {
            return Err(not_supported("logprobs", ""));
        }
        let one = |n: usize| {
            refuse(
                "prompt",
                format!("`prompt` must hold one prompt (batches are not served; send one request each), got {n}"),
            )
        };
        let input = match t.prompt {
            None => return Err(refuse("prompt", "`prompt` is required")),
            Some(Prompt::Text(t)) => PromptInput::Text(t),
            Some(Prompt::Texts(mut v)) if v.len() == 1 => PromptInput::Text(v.remove(0)),
            Some(Prompt::Texts(v)) => return Err(one(v.len())),
            Some(Prompt::Tokens(ids)) => PromptInput::Tokens(ids),
            Some(Prompt::TokenLists(mut v)) if v.len() == 1 => PromptInput::Tokens(v.remove(0)),
            Some(Prompt::TokenLists(v)) => return Err(one(v.len())),
        };
        common_request(common, input, None)
    }
}

/// OpenAI's parameter name for an engine field (`stopping.max_tokens` → `max_tokens`); `max_tokens_param`
/// is the name the client used for the limit.
pub fn param_of(engine_field: &str, max_tokens_param: &str) -> String {
    let (head, index) = match engine_field.find('[') {
        Some(i) => engine_field.split_at(i),
        None => (engine_field, ""),
    };
    let name = match head {
        "text" | "tokens" | "tokens.ids" => "prompt",
        "chat" | "chat.messages" => "messages",
        "stopping.max_tokens" => max_tokens_param,
        "stopping.stop" => "stop",
        "stopping.stop_token_ids" => "stop",
        "kv.method" => "kv_method",
        "kv.min_bits" => "kv_min_bits",
        "kv.priority" => "priority",
        "request_id" => "x-request-id",
        f => f.strip_prefix("sampling.").unwrap_or(f),
    };
    format!("{name}{index}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn chat(body: Value) -> Result<(Request, Delivery), ApiError> {
        parse_chat(body.to_string().as_bytes())?.into_request()
    }

    #[test]
    fn a_chat_request_maps_every_served_field() {
        let (r, d) = chat(json!({
            "model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}]}],
            "max_tokens": 7, "max_completion_tokens": 9, "temperature": 0.5, "top_p": 0.9, "seed": -1,
            "stop": "x", "stream": true, "stream_options": {"include_usage": true}, "n": 1,
            "top_k": 40, "kv_method": "fp16", "kv_min_bits": 4, "priority": -3
        }))
        .unwrap();
        let PromptInput::Chat(m) = &r.input else { panic!() };
        assert_eq!((m[0].role.as_str(), m[0].content.as_str()), ("system", "be brief"));
        assert_eq!(m[1].content, "hi there");
        assert_eq!(
            r.max_tokens,
            Some(9),
            "max_completion_tokens wins over the deprecated max_tokens"
        );
        assert_eq!(r.sampling.temperature, Some(0.5));
        assert_eq!(r.sampling.seed, Some(u64::MAX));
        assert_eq!(r.sampling.top_k, Some(40));
        assert_eq!(r.stop, ["x"]);
        assert_eq!(
            (r.kv_method.as_deref(), r.min_bits, r.priority),
            (Some("fp16"), Some(4), Some(-3))
        );
        assert!(d.stream && d.include_usage);
    }

    #[test]
    fn refused_fields_are_named() {
        for (body, param) in [
            (json!({"messages": [{"role": "user", "content": "x"}], "n": 2}), "n"),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "logprobs": true}),
                "logprobs",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "presence_penalty": 0.5}),
                "presence_penalty",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}),
                "tools",
            ),
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}),
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "max_token": 3}),
                "max_token",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}),
                "temperature",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x"}], "prompt": "y"}),
                "prompt",
            ),
            (
                json!({"messages": [{"role": "user", "content": "x", "colour": 1}]}),
                "messages[0].colour",
            ),
        ] {
            let e = chat(body).expect_err("refused");
            assert_eq!(e.param.as_deref(), Some(param), "{}", e.message);
            assert!(e.message.contains(&format!("`{param}`")), "{}", e.message);
        }
    }

    #[test]
    fn completion_prompts_take_every_single_form_and_refuse_batches() {
        let one = |p: Value| parse_completion(json!({ "prompt": p }).to_string().as_bytes())?.into_request();
        assert!(matches!(one(json!("a")).unwrap().0.input, PromptInput::Text(t) if t == "a"));
        assert!(matches!(one(json!(["a"])).unwrap().0.input, PromptInput::Text(t) if t == "a"));
        assert!(matches!(one(json!([1, 2])).unwrap().0.input, PromptInput::Tokens(t) if t == [1, 2]));
        assert!(matches!(one(json!([[3]])).unwrap().0.input, PromptInput::Tokens(t) if t == [3]));
        let e = one(json!(["a", "b"])).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
        assert!(e.message.contains("got 2"), "{}", e.message);
    }

    #[test]
    fn every_listed_field_is_taken() {
        let v: serde_json::Map<String, Value> = COMMON_FIELDS
            .iter()
            .chain(CHAT_FIELDS)
            .map(|k| (k.to_string(), Value::Null))
            .chain([("messages".to_string(), json!([{"role": "user", "content": "x"}]))])
            .collect();
        assert!(parse_chat(Value::Object(v).to_string().as_bytes()).is_ok());
        let v: serde_json::Map<String, Value> = COMMON_FIELDS
            .iter()
            .chain(COMPLETION_FIELDS)
            .map(|k| (k.to_string(), Value::Null))
            .collect();
        assert!(parse_completion(Value::Object(v).to_string().as_bytes()).is_ok());
    }

    #[test]
    fn engine_fields_read_as_openai_params() {
        assert_eq!(
            param_of("stopping.max_tokens", "max_completion_tokens"),
            "max_completion_tokens"
        );
        assert_eq!(param_of("stopping.stop[2]", "max_tokens"), "stop[2]");
        assert_eq!(param_of("sampling.top_p", "max_tokens"), "top_p");
        assert_eq!(param_of("tokens.ids[4]", "max_tokens"), "prompt[4]");
        assert_eq!(param_of("kv.min_bits", "max_tokens"), "kv_min_bits");
    }
}
