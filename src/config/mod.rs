//! pmkvqd's configuration: the only place that reads config files, `PMKVQ_*` environment variables and argv.
//!
//! Owns: the list of keys ([`KEYS`], each with its default and documentation), merging the sources
//! (defaults < file < env < flags), and one validation pass into a typed [`Config`] that reports every error at
//! once. Does not own: what the values do. Invariants: a key not in [`KEYS`] is an error wherever it appears;
//! every effective value remembers its source (`pmkvqd --print-config`).
#![forbid(unsafe_code)]

mod args;
mod validate;

pub use args::DaemonArgs;

pub use crate::calib::ProfileChoice;
use crate::engine::RequestLimits;
use crate::gpu::DeviceChoice;
use crate::memory::{OperatorCap, PolicyConfig};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One configuration key.
pub struct KeyDef {
    /// `section.name` (or `name` at the top level); env var `PMKVQ_SECTION_NAME`.
    pub key: &'static str,
    pub default: &'static str,
    pub doc: &'static str,
}

/// `engine.prefill_chunk`'s default, for the offline tools that prefill as the daemon does (`pmkvq generate`,
/// `pmkvq eval retrieval`); the key's default below is the same number.
pub const PREFILL_CHUNK: usize = 1024;

/// Every key pmkvqd reads. `deploy/pmkvqd.example.toml` lists exactly these with these defaults (tested).
pub const KEYS: &[KeyDef] = &[
    KeyDef {
        key: "model",
        default: "models/SmolLM2-135M-Instruct.Q4_1.gguf",
        doc: "GGUF file or HF safetensors directory to serve",
    },
    KeyDef {
        key: "profile",
        default: "auto",
        doc: "calibration profile: a path, `none`, or `auto` (profiles/default.profile.json, else another profiles/*.profile.json, calibrated for the model)",
    },
    KeyDef {
        key: "listen",
        default: "127.0.0.1:50051",
        doc: "gRPC listen address: HOST:PORT, or unix:/path/to/socket",
    },
    KeyDef {
        key: "threads",
        default: "0",
        doc: "compute threads (0 = all cores)",
    },
    KeyDef {
        key: "device",
        default: "cpu",
        doc: "cpu, auto (a CUDA GPU if one is usable) or cuda:N; with a GPU its free memory is sampled (cuMemGetInfo)",
    },
    KeyDef {
        key: "log.format",
        default: "pretty",
        doc: "`pretty` or `json` (one object per line)",
    },
    KeyDef {
        key: "log.filter",
        default: "info",
        doc: "tracing env-filter directives, e.g. `info,pmkvq=debug`",
    },
    KeyDef {
        key: "engine.max_running",
        default: "8",
        doc: "sequences decoded together in one batch",
    },
    KeyDef {
        key: "engine.max_queued",
        default: "64",
        doc: "accepted requests waiting for a batch slot; beyond this, RESOURCE_EXHAUSTED",
    },
    KeyDef {
        key: "engine.prefill_chunk",
        default: "1024",
        doc: "prompt tokens per step: bounds how long a long prompt delays other streams; under a tight KV budget a prompt up to twice this long keeps fp16-level retrieval (docs/retrieval.md)",
    },
    KeyDef {
        key: "engine.stream_buffer",
        default: "32",
        doc: "messages buffered per stream before a slow client pauses its sequence",
    },
    KeyDef {
        key: "engine.pause_timeout",
        default: "60s",
        doc: "a sequence whose client has not read for this long ends (cancelled); paused ones take no batch slot",
    },
    KeyDef {
        key: "engine.prepare_threads",
        default: "2",
        doc: "threads that tokenize prompts and render chat templates, off the network runtime; requests beyond them \
              wait holding their queue place",
    },
    KeyDef {
        key: "engine.kv_method",
        default: "pmkvq",
        doc: "default KV cache: fp16, pmkvq, pmkvq:direct, pmkvq:modified, rtn:<b>, kivi:<b>, q8_0, q4_0",
    },
    KeyDef {
        key: "engine.default_max_tokens",
        default: "256",
        doc: "max_tokens when a request does not say",
    },
    KeyDef {
        key: "engine.max_tokens_limit",
        default: "8192",
        doc: "largest max_tokens a request may ask for",
    },
    KeyDef {
        key: "engine.max_stop",
        default: "16",
        doc: "most stop strings (and, separately, stop token ids) per request",
    },
    KeyDef {
        key: "engine.kv_state_every",
        default: "16",
        doc: "attach the KV state to a stream every this many tokens (0 = only at the end)",
    },
    KeyDef {
        key: "engine.spill_dir",
        default: "",
        doc: "where preempted sequences' KV caches are spilled (empty = the system temp dir / pmkvq-spill); created \
              0700, and refused when it is a symlink, someone else's, or open to group or others",
    },
    KeyDef {
        key: "engine.spill_max_bytes",
        default: "4GiB",
        doc: "most bytes the spill files may hold at once (0 = no limit); a preemption past it ends the victim with \
              memory_pressure",
    },
    KeyDef {
        key: "engine.on_memory_pressure",
        default: "end",
        doc: "a reasoning trace whose KV floor will soon no longer fit: `end` it with memory_pressure when it does not, \
              or `conclude`: close its thinking span while engine.conclude_reserve tokens still fit, so it answers",
    },
    KeyDef {
        key: "engine.conclude_reserve",
        default: "64",
        doc: "with on_memory_pressure = conclude: tokens of room kept for the answer",
    },
    KeyDef {
        key: "memory.budget",
        default: "auto",
        doc: "operator KV budget cap: `auto` (follow memory), bytes such as `512MiB`, or a fraction such as `0.5` of usable memory",
    },
    KeyDef {
        key: "memory.reserve",
        default: "256MiB",
        doc: "memory kept free for everything else before the KV cache gets its share",
    },
    KeyDef {
        key: "memory.fraction",
        default: "0.5",
        doc: "share of the available memory (after the reserve) the KV cache may take",
    },
    KeyDef {
        key: "memory.interval",
        default: "500ms",
        doc: "how often memory is sampled",
    },
    KeyDef {
        key: "memory.hysteresis",
        default: "0.05",
        doc: "relative change below which a new automatic budget is not applied",
    },
    KeyDef {
        key: "memory.min_interval",
        default: "2s",
        doc: "minimum time between two automatic budget increases",
    },
    KeyDef {
        key: "memory.pressure_some_pct",
        default: "10",
        doc: "PSI memory `some avg10` (percent) above which the fraction is halved",
    },
    KeyDef {
        key: "memory.root",
        default: "/",
        doc: "root the memory samplers read /proc and /sys under (a container with the host's /proc mounted elsewhere)",
    },
    KeyDef {
        key: "server.max_connections",
        default: "512",
        doc: "open gRPC connections at most; further clients wait in the listen backlog until one closes",
    },
    KeyDef {
        key: "server.max_streams_per_connection",
        default: "32",
        doc: "concurrent RPCs one HTTP/2 connection may carry (SETTINGS_MAX_CONCURRENT_STREAMS)",
    },
    KeyDef {
        key: "server.handshake_timeout",
        default: "10s",
        doc: "a new connection must send the HTTP/2 preface, and finish the TLS handshake, within this or it is closed",
    },
    KeyDef {
        key: "server.keepalive_interval",
        default: "30s",
        doc: "HTTP/2 ping to a connection after this long without traffic (0s = off)",
    },
    KeyDef {
        key: "server.keepalive_timeout",
        default: "10s",
        doc: "a connection whose peer does not answer a ping within this is closed",
    },
    KeyDef {
        key: "auth.token",
        default: "",
        doc: "bearer token admin RPCs require (empty = none); prefer auth.token_file",
    },
    KeyDef {
        key: "auth.token_file",
        default: "",
        doc: "file holding the admin bearer token",
    },
    KeyDef {
        key: "auth.allow_insecure_remote",
        default: "false",
        doc: "allow a non-loopback listener without an admin token",
    },
    KeyDef {
        key: "tls.cert",
        default: "",
        doc: "PEM certificate chain: serve TLS (with tls.key)",
    },
    KeyDef {
        key: "tls.key",
        default: "",
        doc: "PEM private key for tls.cert",
    },
    KeyDef {
        key: "http.listen",
        default: "",
        doc: "OpenAI-compatible HTTP API address (HOST:PORT): /v1/chat/completions, /v1/completions, /v1/models, \
              /health; empty = off. Same TLS, admin token and connection limits as gRPC",
    },
    KeyDef {
        key: "http.model_name",
        default: "",
        doc: "the model id /v1/models lists and requests name (empty = the model's file name)",
    },
    KeyDef {
        key: "http.metrics",
        default: "false",
        doc: "also serve the Prometheus text on the HTTP listener's /metrics",
    },
    KeyDef {
        key: "metrics.listen",
        default: "",
        doc: "Prometheus text endpoint address (HOST:PORT, path /metrics); empty = off",
    },
    KeyDef {
        key: "shutdown.grace",
        default: "30s",
        doc: "on SIGTERM/SIGINT, how long in-flight streams may run before they are cancelled",
    },
];

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => write!(f, "default"),
            Source::File(p) => write!(f, "file {}", p.display()),
            Source::Env(v) => write!(f, "env {v}"),
            Source::Flag(s) => write!(f, "flag {s}"),
        }
    }
}

/// Merged but unvalidated values, each with its source.
#[derive(Clone, Debug)]
pub struct RawConfig {
    values: BTreeMap<&'static str, (String, Source)>,
}

/// The environment variable for a key: `engine.max_running` → `PMKVQ_ENGINE_MAX_RUNNING`.
pub fn env_name(key: &str) -> String {
    format!("PMKVQ_{}", key.replace('.', "_").to_ascii_uppercase())
}

fn key_def(key: &str) -> Option<&'static KeyDef> {
    KEYS.iter().find(|k| k.key == key)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Where pmkvqd listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// Limits on connections at the gRPC listener (`server.*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EdgeLimits {
    pub max_connections: usize,
    pub max_streams_per_connection: u32,
    pub handshake_timeout: Duration,
    /// `None`: no keepalive pings.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
}

/// The OpenAI-compatible HTTP listener (`http.*`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpConfig {
    /// `None`: off.
    pub listen: Option<SocketAddr>,
    /// Empty: the model's file name.
    pub model_name: String,
    /// Serve `/metrics` there too.
    pub metrics: bool,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub model: PathBuf,
    pub profile: ProfileChoice,
    pub listen: ListenAddr,
    pub threads: usize,
    pub device: DeviceChoice,
    pub log_format: LogFormat,
    pub log_filter: String,
    pub max_running: usize,
    pub max_queued: usize,
    pub prefill_chunk: usize,
    pub stream_buffer: usize,
    pub pause_timeout: Duration,
    pub prepare_threads: usize,
    pub limits: RequestLimits,
    pub shutdown_grace: Duration,
    pub spill_dir: PathBuf,
    /// `engine.spill_max_bytes` (`None` = no limit).
    pub spill_max_bytes: Option<u64>,
    /// `engine.on_memory_pressure = "conclude"`: the tokens kept for the answer (`None`: `end`).
    pub conclude_reserve: Option<usize>,
    pub memory_cap: OperatorCap,
    pub memory_policy: PolicyConfig,
    pub memory_interval: Duration,
    pub memory_root: PathBuf,
    pub admin_token: Option<String>,
    /// PEM certificate chain and key.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
    pub metrics_listen: Option<SocketAddr>,
    pub http: HttpConfig,
    pub edge: EdgeLimits,
    /// Test-only fault injection in the engine; no file, variable or flag sets it.
    #[doc(hidden)]
    pub fault: Option<crate::engine::FaultHook>,
}

/// What `pmkvqd` was asked to do.
pub enum Action {
    Run(Box<Config>, RawConfig),
    PrintConfig(RawConfig),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// `--help`, `--version` or a malformed command line (clap formats it).
    #[error("{0}")]
    Cli(#[from] clap::Error),
    /// Every problem found, one per line.
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

impl RawConfig {
    fn defaults() -> Self {
        RawConfig {
            values: KEYS
                .iter()
                .map(|k| (k.key, (k.default.to_string(), Source::Default)))
                .collect(),
        }
    }

    fn set(&mut self, key: &str, value: String, src: Source, errors: &mut Vec<String>) {
        match key_def(key) {
            Some(k) => {
                self.values.insert(k.key, (value, src));
            }
            None => errors.push(format!("unknown key `{key}` (from {src})")),
        }
    }

    pub fn get(&self, key: &str) -> Option<&(String, Source)> {
        self.values.get(key)
    }

    /// The effective configuration as TOML, each value annotated with its source.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut section = "";
        for k in KEYS {
            let (v, src) = &self.values[k.key];
            let (sec, name) = k.key.split_once('.').unwrap_or(("", k.key));
            if sec != section {
                let _ = write!(out, "\n[{sec}]\n");
                section = sec;
            }
            let _ = writeln!(out, "{name} = {}  # {src}", toml_value(v));
        }
        out
    }
}

/// Numbers stay bare; everything else is a quoted TOML string.
fn toml_value(v: &str) -> String {
    if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit()) {
        v.to_string()
    } else {
        toml::Value::String(v.to_string()).to_string()
    }
}

/// Merge defaults, `file` (if any), the environment and the flags; then validate. `env` looks a variable up
/// (tests pass a map; the binary passes `std::env::var`).
pub fn load(argv: Vec<OsString>, env: &dyn Fn(&str) -> Option<String>) -> Result<Action, ConfigError> {
    let args = <DaemonArgs as clap::Parser>::try_parse_from(argv)?;
    let mut errors = Vec::new();
    let mut raw = RawConfig::defaults();
    let file = args.config.clone().or_else(|| env("PMKVQ_CONFIG").map(PathBuf::from));
    if let Some(path) = &file {
        read_file(path, &mut raw, &mut errors);
    }
    for k in KEYS {
        let var = env_name(k.key);
        if let Some(v) = env(&var) {
            raw.set(k.key, v, Source::Env(var), &mut errors);
        }
    }
    for (key, value, flag) in args.overrides(&mut errors) {
        raw.set(&key, value, Source::Flag(flag), &mut errors);
    }
    if args.print_config {
        return if errors.is_empty() {
            Ok(Action::PrintConfig(raw))
        } else {
            Err(ConfigError::Invalid(errors))
        };
    }
    let cfg = validate::validate(&raw, &mut errors);
    match cfg {
        Some(c) if errors.is_empty() => Ok(Action::Run(Box::new(c), raw)),
        _ => Err(ConfigError::Invalid(errors)),
    }
}

fn read_file(path: &Path, raw: &mut RawConfig, errors: &mut Vec<String>) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => return errors.push(format!("config file {}: {e}", path.display())),
    };
    let table: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => return errors.push(format!("config file {}: {e}", path.display())),
    };
    let src = Source::File(path.to_path_buf());
    for (key, value) in flatten(&table) {
        match value {
            Ok(v) => raw.set(&key, v, src.clone(), errors),
            Err(kind) => errors.push(format!(
                "`{key}` in {} must be a string, number or boolean, got {kind}",
                path.display()
            )),
        }
    }
}

/// `[engine] max_running = 8` → (`engine.max_running`, "8").
pub fn flatten(table: &toml::Table) -> Vec<(String, Result<String, &'static str>)> {
    let mut out = Vec::new();
    for (k, v) in table {
        match v {
            toml::Value::Table(t) => {
                for (k2, v2) in t {
                    out.push((format!("{k}.{k2}"), scalar(v2)));
                }
            }
            other => out.push((k.clone(), scalar(other))),
        }
    }
    out
}

fn scalar(v: &toml::Value) -> Result<String, &'static str> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(_) => Err("a datetime"),
        toml::Value::Array(_) => Err("an array"),
        toml::Value::Table(_) => Err("a table"),
    }
}

/// Configuration for tests and embedders: defaults, then `key=value` pairs as if given with `--set`.
pub fn from_pairs(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
    let mut argv: Vec<OsString> = vec!["pmkvqd".into()];
    for (k, v) in pairs {
        argv.push("--set".into());
        argv.push(format!("{k}={v}").into());
    }
    match load(argv, &|_| None)? {
        Action::Run(c, _) => Ok(*c),
        Action::PrintConfig(_) => unreachable!("--print-config was not passed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "threads = 3\n[engine]\nmax_running = 5\nmax_queued = 7\n").unwrap();
        let env = env_of(&[("PMKVQ_ENGINE_MAX_RUNNING", "6"), ("PMKVQ_ENGINE_MAX_QUEUED", "9")]);
        let argv = vec![
            "pmkvqd".into(),
            "--config".into(),
            f.clone().into_os_string(),
            "--set".into(),
            "engine.max_queued=11".into(),
        ];
        let Action::Run(c, raw) = load(argv, &env).unwrap() else {
            panic!()
        };
        assert_eq!(c.threads, 3);
        assert_eq!(c.max_running, 6);
        assert_eq!(c.max_queued, 11);
        assert_eq!(c.prefill_chunk, 1024);
        let key = KEYS.iter().find(|k| k.key == "engine.prefill_chunk").unwrap();
        assert_eq!(key.default.parse::<usize>().unwrap(), PREFILL_CHUNK);
        assert_eq!(raw.get("threads").unwrap().1, Source::File(f));
        assert_eq!(
            raw.get("engine.max_running").unwrap().1,
            Source::Env("PMKVQ_ENGINE_MAX_RUNNING".into())
        );
        assert_eq!(raw.get("engine.prefill_chunk").unwrap().1, Source::Default);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let env = env_of(&[("PMKVQ_ENGINE_MAX_RUNNING", "0"), ("PMKVQ_LISTEN", "localhost")]);
        let argv = vec![
            "pmkvqd".into(),
            "--set".into(),
            "shutdown.grace=soon".into(),
            "--set".into(),
            "engine.bogus=1".into(),
            "--log-format".into(),
            "xml".into(),
        ];
        let Err(ConfigError::Invalid(errs)) = load(argv, &env) else {
            panic!("must fail")
        };
        let all = errs.join("\n");
        for needle in [
            "engine.max_running",
            "listen",
            "shutdown.grace",
            "engine.bogus",
            "log.format",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
        assert_eq!(errs.len(), 5, "{all}");
    }

    #[test]
    fn the_http_listener_is_checked_like_the_grpc_one() {
        let errs = |pairs: &[(&str, &str)]| match from_pairs(pairs) {
            Err(ConfigError::Invalid(e)) => e.join("\n"),
            Err(e) => panic!("{e}"),
            Ok(_) => String::new(),
        };
        let e = errs(&[("http.listen", "0.0.0.0:8080")]);
        assert!(e.contains("`http.listen`") && e.contains("auth.token"), "{e}");
        let e = errs(&[("http.listen", "localhost:8080")]);
        assert!(e.contains("`http.listen`") && e.contains("HOST:PORT"), "{e}");
        let c = from_pairs(&[("http.listen", "0.0.0.0:8080"), ("auth.token", "a-token-of-16-chars")]).unwrap();
        assert_eq!(c.http.listen, Some("0.0.0.0:8080".parse().unwrap()));
        assert_eq!(from_pairs(&[]).unwrap().http.listen, None, "off by default");
    }

    #[test]
    fn env_names() {
        assert_eq!(env_name("engine.max_running"), "PMKVQ_ENGINE_MAX_RUNNING");
        assert_eq!(
            KEYS[0].default,
            format!("models/{}", crate::fetch::DEFAULT_MODEL_FILE),
            "the model default must be where fetch-model puts it"
        );
    }

    #[test]
    fn rendered_config_parses_back_to_the_same_values() {
        let raw = RawConfig::defaults();
        let table: toml::Table = raw.render().parse().unwrap();
        for (k, v) in flatten(&table) {
            assert_eq!(v.unwrap(), key_def(&k).unwrap().default, "{k}");
        }
    }
}
