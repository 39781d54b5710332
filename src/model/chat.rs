//! Chat templates: the Jinja template from the model's metadata, rendered with minijinja (+ Python string
//! methods, `tojson` and `strftime_now`, which HF templates call) exactly as `transformers.apply_chat_template`
//! would: tests/chat_templates.rs checks it against jinja2 on every real template llama.cpp keeps.

use super::ModelError;

mod py;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Roles a chat may contain.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// Template instructions one render may run. Templates come from model files: one that loops must end with an
/// error in bounded time. Real chat templates over long conversations use tens of thousands.
pub const TEMPLATE_FUEL: u64 = 5_000_000;

/// The most bytes a rendered prompt may have (the messages themselves are bounded by the transport).
pub const MAX_RENDERED_BYTES: usize = 16 << 20;

pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
}

impl ChatTemplate {
    pub fn new(source: &str) -> Result<Self, ModelError> {
        let mut env = minijinja::Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        // transformers' chat-template environment: block tags eat their own line's whitespace and newline.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", py::tojson);
        env.add_function("strftime_now", py::strftime_now);
        env.add_test("iterable", py::is_iterable);
        env.add_function("raise_exception", |msg: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| ModelError::Template(e.to_string()))?;
        Ok(ChatTemplate { env })
    }

    /// Render `messages` with a generation prompt, using the tokenizer's BOS/EOS texts, and tokenize the result
    /// (without adding BOS: the template writes it where the model wants one).
    pub fn encode(&self, tok: &super::Tokenizer, messages: &[ChatMessage]) -> Result<Vec<u32>, ModelError> {
        self.encode_with(tok, messages, None)
    }

    /// [`ChatTemplate::encode`] with the template variable `enable_thinking` (Qwen3's switch; undefined when
    /// `None`, as templates that test `enable_thinking is defined` expect).
    pub fn encode_with(
        &self,
        tok: &super::Tokenizer,
        messages: &[ChatMessage],
        enable_thinking: Option<bool>,
    ) -> Result<Vec<u32>, ModelError> {
        let bos = tok.bos.map(|b| tok.decode(&[b], true)).unwrap_or_default();
        let eos = tok.eos.first().map(|&e| tok.decode(&[e], true)).unwrap_or_default();
        let text = self.render_with(messages, true, &bos, &eos, enable_thinking)?;
        tok.encode(&text, false)
    }

    /// Render `messages`; `bos`/`eos` are the texts of those tokens (some templates print them).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
    ) -> Result<String, ModelError> {
        self.render_with(messages, add_generation_prompt, bos, eos, None)
    }

    /// [`ChatTemplate::render`] with `enable_thinking` defined when `Some`.
    pub fn render_with(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos: &str,
        eos: &str,
        enable_thinking: Option<bool>,
    ) -> Result<String, ModelError> {
        if messages.is_empty() {
            return Err(ModelError::Template("`messages` must not be empty".into()));
        }
        if let Some((i, m)) = messages
            .iter()
            .enumerate()
            .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
        {
            return Err(ModelError::Template(format!(
                "`messages[{i}].role` must be one of {ROLES:?}, got `{}`",
                m.role
            )));
        }
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ModelError::Template(e.to_string()))?;
        let mut out = CappedWriter(Vec::new());
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => bos,
            eos_token => eos,
            enable_thinking => enable_thinking.map_or(minijinja::Value::UNDEFINED, minijinja::Value::from),
            // apply_chat_template passes these as None when a request has none (`tools is not none` tests work).
            tools => minijinja::Value::from(()),
            documents => minijinja::Value::from(()),
        };
        tmpl.render_captured_to(ctx, &mut out).map_err(|e| {
            ModelError::Template(match e.kind() {
                minijinja::ErrorKind::OutOfFuel => {
                    format!("the chat template ran more than {TEMPLATE_FUEL} instructions (does it loop?)")
                }
                minijinja::ErrorKind::WriteFailure => {
                    format!("the chat template's output exceeds {MAX_RENDERED_BYTES} bytes")
                }
                _ => e.to_string(),
            })
        })?;
        String::from_utf8(out.0)
            .map_err(|e| ModelError::Template(format!("the chat template wrote invalid UTF-8: {e}")))
    }
}

/// A buffer that refuses to grow past [`MAX_RENDERED_BYTES`] (the render stops with a write error).
struct CappedWriter(Vec<u8>);

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.0.len() + buf.len() > MAX_RENDERED_BYTES {
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_python_methods_and_rejects_bad_roles() {
        let t = ChatTemplate::new("{% for m in messages %}[{{ m.role.upper() }}]{{ m.content.strip() }}{% endfor %}{% if add_generation_prompt %}>{% endif %}").unwrap();
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "  hi ".into(),
        }];
        assert_eq!(t.render(&msgs, true, "", "").unwrap(), "[USER]hi>");
        let bad = vec![ChatMessage {
            role: "robot".into(),
            content: "x".into(),
        }];
        let err = t.render(&bad, true, "", "").unwrap_err().to_string();
        assert!(err.contains("messages[0].role"), "{err}");
        let raising = ChatTemplate::new("{{ raise_exception('no system role') }}").unwrap();
        assert!(raising
            .render(&msgs, false, "", "")
            .unwrap_err()
            .to_string()
            .contains("no system role"));
    }

    #[test]
    fn a_template_that_loops_or_floods_ends_with_an_error_in_bounded_time() {
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: "x".repeat(10_000),
        }];
        let t0 = std::time::Instant::now();
        let spin = ChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}{% endfor %}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = spin.render(&msgs, true, "", "").unwrap_err().to_string();
        assert!(err.contains("instructions"), "{err}");
        let flood = ChatTemplate::new(
            "{% for i in range(10000) %}{% for m in messages %}{{ m.content }}{% endfor %}{% endfor %}",
        )
        .unwrap();
        let err = flood.render(&msgs, true, "", "").unwrap_err().to_string();
        assert!(err.contains("exceeds"), "{err}");
        assert!(t0.elapsed() < std::time::Duration::from_secs(10), "{:?}", t0.elapsed());
    }
}
