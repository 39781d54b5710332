//! Fuzz targets: each takes arbitrary bytes, feeds them to one parser or validator the daemon exposes to files or
//! clients, and must return — an error is fine, a panic, abort or hang is a bug. `fuzz/` runs them under AFL++
//! (`scripts/fuzz.sh`); `tests/fuzz_corpus.rs` replays every corpus file through them in the test command, so
//! what a fuzzer once found stays fixed.
//!
//! Targets: the GGUF reader with the model and tokenizer it builds ([`gguf`]), the safetensors directory (header,
//! config.json, tokenizer.json: [`safetensors_dir`]), tokenizer construction from `tokenizer.json`
//! ([`tokenizer_json`]), chat template rendering ([`chat_template`]), config files ([`config_file`]), the spill
//! codecs of every cache ([`spill`]), the request validator behind Generate ([`request`]) and the OpenAI-compatible
//! bodies behind the HTTP API ([`openai`]).
#![doc(hidden)]

use crate::engine::Frontend;
use crate::kvcache::{KvGeometry, KvMethod, KvStore, PmkvqConfig, PmkvqStore};
use crate::model::chat::{ChatMessage, ChatTemplate};
use crate::model::{LoadOptions, Model, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

/// A scratch path of this process (tmpfs when there is one: every execution writes it).
fn scratch(name: &str) -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("pmkvq-fuzz-{}-{name}", std::process::id()))
}

/// Load `data` as a GGUF model file.
pub fn gguf(data: &[u8]) {
    let p = scratch("model.gguf");
    if std::fs::write(&p, data).is_ok() {
        let _ = Model::load(&p, &LoadOptions { threads: 1 });
    }
    let _ = std::fs::remove_file(&p);
}

/// Separates the files of one input (`config.json`, `tokenizer.json`, `model.safetensors`).
pub const FILE_SEPARATOR: &[u8] = b"\n--8<--\n";

fn split_files(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match rest.windows(FILE_SEPARATOR.len()).position(|w| w == FILE_SEPARATOR) {
            Some(i) => {
                out.push(&rest[..i]);
                rest = &rest[i + FILE_SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    out.resize(n, &[]);
    out
}

/// Load a safetensors model directory whose `config.json`, `tokenizer.json` and `model.safetensors` are the
/// three parts of `data` (split at [`FILE_SEPARATOR`]).
pub fn safetensors_dir(data: &[u8]) {
    let dir = scratch("hf");
    let parts = split_files(data, 3);
    let ok = std::fs::create_dir_all(&dir).is_ok()
        && ["config.json", "tokenizer.json", "model.safetensors"]
            .iter()
            .zip(&parts)
            .all(|(name, bytes)| std::fs::write(dir.join(name), bytes).is_ok());
    if ok {
        let _ = Model::load(&dir, &LoadOptions { threads: 1 });
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Build a tokenizer from `tokenizer.json` bytes and a `tokenizer_config.json` (the parts of `data`), then
/// encode and decode a little text with it.
pub fn tokenizer_json(data: &[u8]) {
    let parts = split_files(data, 2);
    let config = std::str::from_utf8(parts[1]).ok().filter(|c| !c.is_empty());
    if let Ok(t) = Tokenizer::from_hf_files(parts[0], config) {
        if let Ok(ids) = t.encode("Hello, <|im_start|> wörld 123\n", true) {
            let _ = t.decode(&ids, true);
        }
        if let Some(tmpl) = t.chat_template.as_deref() {
            chat_template(tmpl.as_bytes());
        }
    }
}

/// Render a chat template: `data` is the template source, a NUL, then messages, one `role:content` per line.
pub fn chat_template(data: &[u8]) {
    let (src, msgs) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b"user:Hello\nassistant:Hi"[..]),
    };
    let (Ok(src), Ok(msgs)) = (std::str::from_utf8(src), std::str::from_utf8(msgs)) else {
        return;
    };
    let messages: Vec<ChatMessage> = msgs
        .lines()
        .map(|l| {
            let (role, content) = l.split_once(':').unwrap_or(("user", l));
            ChatMessage {
                role: role.to_string(),
                content: content.to_string(),
            }
        })
        .collect();
    if let Ok(t) = ChatTemplate::new(src) {
        let _ = t.render(&messages, true, "<s>", "</s>");
    }
}

/// Read `data` as pmkvqd's config file (validation included).
pub fn config_file(data: &[u8]) {
    let p = scratch("pmkvqd.toml");
    if std::fs::write(&p, data).is_ok() {
        let argv = vec!["pmkvqd".into(), "--config".into(), p.clone().into_os_string()];
        let _ = crate::config::load(argv, &|_| None);
    }
    let _ = std::fs::remove_file(&p);
}

/// Restore `data` as a spill into every kind of cache; a cache that accepts it must then work.
pub fn spill(data: &[u8]) {
    let g = KvGeometry {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 32,
    };
    for method in ["fp16", "pmkvq", "pmkvq:direct", "rtn:4", "kivi:2", "q4_0", "q8_0"] {
        let Ok(m) = method.parse::<KvMethod>() else { continue };
        if let Ok(mut s) = m.new_store(g, None, 512) {
            if s.restore(data).is_ok() {
                exercise(s.as_mut(), g);
            }
        }
    }
    // restored into a budget, as a resumed sequence is
    if let Ok(mut s) = PmkvqStore::new(g, PmkvqConfig::pmkvq(), &[usize::MAX; 2], 512) {
        if s.restore_within(data, 64 << 10, None, 1).is_ok() {
            exercise(&mut s, g);
        }
    }
}

/// One decode step and a round trip: what a resumed sequence does first.
fn exercise(s: &mut dyn KvStore, g: KvGeometry) {
    let q = vec![0.25f32; g.q_dim()];
    let kv = vec![-0.5f32; g.kv_dim()];
    let mut out = vec![0f32; g.q_dim()];
    if s.reserve(1).is_ok() {
        for l in 0..g.layers {
            let _ = s.attend_and_store(l, &q, &kv, &kv, 1, &mut out);
        }
    }
    let _ = s.spill();
    let _ = s.true_bytes();
}

fn request_frontend() -> Option<&'static Frontend> {
    static FRONTEND: OnceLock<Option<Frontend>> = OnceLock::new();
    FRONTEND
        .get_or_init(|| {
            let path = std::env::var_os("PMKVQ_MODEL").map(PathBuf::from).unwrap_or_else(|| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("models")
                    .join(crate::fetch::DEFAULT_MODEL_FILE)
            });
            let (model, tok) = Model::load(&path, &LoadOptions { threads: 1 }).ok()?;
            // the daemon's defaults, from the one place that has them
            let limits = crate::config::from_pairs(&[]).ok()?.limits;
            Frontend::new(
                std::sync::Arc::new(tok),
                model.config.context_length,
                model.config.vocab_size,
                limits,
                None,
                crate::kvcache::KvExtensions::ALL,
            )
            .ok()
        })
        .as_ref()
}

/// Decode `data` as a Generate request and validate it as the daemon does (the default model's tokenizer and
/// chat template). Returns false when the model is missing (the target cannot run).
pub fn request(data: &[u8]) -> bool {
    let Some(f) = request_frontend() else {
        return false;
    };
    use prost::Message;
    if let Ok(req) = crate::server::proto::GenerateRequest::decode(data) {
        if let Ok(r) = crate::server::convert::request_of(req) {
            let _ = f.validate(r, "fuzz".into());
        }
    }
    true
}

/// Parse `data` as an OpenAI-compatible HTTP body (chat when it mentions `"messages"`, completions otherwise),
/// convert it and validate it as the daemon does. Returns false when the model is missing.
pub fn openai(data: &[u8]) -> bool {
    use crate::server::http::openai as oa;
    let Some(f) = request_frontend() else {
        return false;
    };
    let chat = data.windows(10).any(|w| w == b"\"messages\"");
    let parsed = if chat {
        oa::parse_chat(data).and_then(|r| r.into_request())
    } else {
        oa::parse_completion(data).and_then(|r| r.into_request())
    };
    if let Ok((r, _)) = parsed {
        let _ = f.validate(r, "fuzz".into());
    }
    true
}

/// A fuzz target: any bytes in, no panic out.
pub type Target = fn(&[u8]);

/// The targets by name (the fuzz binaries and the corpus replay use the same table).
pub const TARGETS: &[(&str, Target)] = &[
    ("gguf", gguf),
    ("safetensors", safetensors_dir),
    ("tokenizer", tokenizer_json),
    ("chat_template", chat_template),
    ("config", config_file),
    ("spill", spill),
    ("request", request_unit),
    ("openai", openai_unit),
];

fn openai_unit(data: &[u8]) {
    assert!(
        openai(data),
        "the openai target needs the default model (deploy/fetch-model.sh models)"
    );
}

fn request_unit(data: &[u8]) {
    assert!(
        request(data),
        "the request target needs the default model (deploy/fetch-model.sh models)"
    );
}
