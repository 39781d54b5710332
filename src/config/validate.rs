//! Raw values → typed [`Config`]: one function per section of [`KEYS`](super::KEYS), in the table's order, each
//! parsing exactly its keys. Every problem is collected (never only the first), each naming the key, where its
//! value came from and the bound it broke.

use super::{Config, EdgeLimits, HttpConfig, ListenAddr, LogFormat, ProfileChoice, RawConfig};
use crate::engine::RequestLimits;
use crate::gpu::DeviceChoice;
use crate::kvcache::KvMethod;
use crate::memory::{OperatorCap, PolicyConfig};
use crate::units::{parse_bytes, parse_duration};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The raw values and the problems found so far.
struct Fields<'a> {
    raw: &'a RawConfig,
    errors: &'a mut Vec<String>,
}

impl<'a> Fields<'a> {
    fn val(&self, key: &str) -> &'a str {
        self.raw.values[key].0.as_str()
    }

    fn bad(&mut self, key: &str, what: String) {
        let src = &self.raw.values[key].1;
        self.errors.push(format!("`{key}` (from {src}) {what}"));
    }

    fn count(&mut self, key: &str, min: usize, max: usize) -> usize {
        match self.val(key).trim().parse::<usize>() {
            Ok(n) if (min..=max).contains(&n) => n,
            Ok(n) => {
                self.bad(key, format!("must be in {min}..={max}, got {n}"));
                min
            }
            Err(_) => {
                let v = self.val(key);
                self.bad(key, format!("must be a whole number, got `{v}`"));
                min
            }
        }
    }

    fn duration(&mut self, key: &str) -> Duration {
        parse_duration(self.val(key)).unwrap_or_else(|| {
            let v = self.val(key);
            self.bad(key, format!("must be a duration such as 30s or 500ms, got `{v}`"));
            Duration::ZERO
        })
    }

    fn duration_at_least(&mut self, key: &str, min: Duration) -> Duration {
        let d = self.duration(key);
        if d < min {
            let v = self.val(key);
            self.bad(key, format!("must be >= {min:?}, got `{v}`"));
        }
        d
    }

    fn number(&mut self, key: &str, lo: f64, hi: f64) -> f64 {
        match self.val(key).trim().parse::<f64>() {
            Ok(x) if x >= lo && x <= hi => x,
            _ => {
                let v = self.val(key);
                self.bad(key, format!("must be a number in [{lo}, {hi}], got `{v}`"));
                lo
            }
        }
    }

    fn flag(&mut self, key: &str) -> bool {
        match self.val(key) {
            "true" => true,
            "false" => false,
            v => {
                self.bad(key, format!("must be true or false, got `{v}`"));
                false
            }
        }
    }
}

/// The typed configuration, or `None` when `errors` gained an entry.
pub(super) fn validate(raw: &RawConfig, errors: &mut Vec<String>) -> Option<Config> {
    let before = errors.len();
    let mut f = Fields { raw, errors };
    let top = top_level(&mut f);
    let (log_format, log_filter) = log(&mut f);
    let engine = engine(&mut f);
    let shutdown_grace = f.duration("shutdown.grace");
    let memory = memory(&mut f);
    let edge = server(&mut f);
    let admin_token = auth(&mut f, &top.listen);
    let tls = tls(&mut f);
    let http = http(&mut f, admin_token.is_some());
    let metrics_listen = metrics(&mut f);
    if f.errors.len() > before {
        return None;
    }
    Some(Config {
        model: top.model,
        profile: top.profile,
        listen: top.listen,
        threads: top.threads,
        device: top.device,
        log_format,
        log_filter,
        max_running: engine.max_running,
        max_queued: engine.max_queued,
        prefill_chunk: engine.prefill_chunk,
        stream_buffer: engine.stream_buffer,
        pause_timeout: engine.pause_timeout,
        prepare_threads: engine.prepare_threads,
        limits: engine.limits,
        shutdown_grace,
        spill_dir: engine.spill_dir,
        spill_max_bytes: engine.spill_max_bytes,
        conclude_reserve: engine.conclude_reserve,
        memory_cap: memory.cap,
        memory_policy: memory.policy,
        memory_interval: memory.interval,
        memory_root: memory.root,
        admin_token,
        tls,
        metrics_listen,
        http,
        edge,
        fault: None,
    })
}

struct TopLevel {
    model: PathBuf,
    profile: ProfileChoice,
    listen: ListenAddr,
    threads: usize,
    device: DeviceChoice,
}

/// `model`, `profile`, `listen`, `threads`, `device`.
fn top_level(f: &mut Fields<'_>) -> TopLevel {
    let model = PathBuf::from(f.val("model"));
    if f.val("model").is_empty() {
        f.bad("model", "must not be empty".into());
    }
    let profile: ProfileChoice = match f.val("profile").parse() {
        Ok(p) => p,
        Err(never) => match never {},
    };
    let listen = match f.val("listen").strip_prefix("unix:") {
        Some(p) if !p.is_empty() => ListenAddr::Unix(PathBuf::from(p)),
        _ => ListenAddr::Tcp(f.val("listen").parse::<SocketAddr>().unwrap_or_else(|_| {
            let v = f.val("listen");
            f.bad(
                "listen",
                format!("must be HOST:PORT with an IP address (e.g. 127.0.0.1:50051) or unix:/path, got `{v}`"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })),
    };
    let threads = f.count("threads", 0, 1024);
    let device = f.val("device").parse::<DeviceChoice>().unwrap_or_else(|e| {
        f.bad("device", e);
        DeviceChoice::Cpu
    });
    TopLevel {
        model,
        profile,
        listen,
        threads,
        device,
    }
}

/// `log.format`, `log.filter`.
fn log(f: &mut Fields<'_>) -> (LogFormat, String) {
    let format = match f.val("log.format") {
        "pretty" => LogFormat::Pretty,
        "json" => LogFormat::Json,
        other => {
            f.bad("log.format", format!("must be `pretty` or `json`, got `{other}`"));
            LogFormat::Pretty
        }
    };
    let filter = f.val("log.filter").to_string();
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&filter) {
        f.bad("log.filter", format!("is not a valid filter: {e}"));
    }
    (format, filter)
}

struct EngineSection {
    max_running: usize,
    max_queued: usize,
    prefill_chunk: usize,
    stream_buffer: usize,
    pause_timeout: Duration,
    prepare_threads: usize,
    limits: RequestLimits,
    spill_dir: PathBuf,
    spill_max_bytes: Option<u64>,
    conclude_reserve: Option<usize>,
}

/// `engine.*`: batch and queue sizes, request limits and defaults, the spill directory.
fn engine(f: &mut Fields<'_>) -> EngineSection {
    let max_running = f.count("engine.max_running", 1, 256);
    let max_queued = f.count("engine.max_queued", 1, 65_536);
    let prefill_chunk = f.count("engine.prefill_chunk", 1, 65_536);
    let stream_buffer = f.count("engine.stream_buffer", 2, 4096);
    let pause_timeout = f.duration_at_least("engine.pause_timeout", Duration::from_millis(100));
    let prepare_threads = f.count("engine.prepare_threads", 1, 64);
    let default_kv_method = f.val("engine.kv_method").parse::<KvMethod>().unwrap_or_else(|e| {
        f.bad("engine.kv_method", e.to_string());
        KvMethod::Fp16
    });
    let max_tokens_limit = f.count("engine.max_tokens_limit", 1, 1 << 20);
    let default_max_tokens = f.count("engine.default_max_tokens", 1, 1 << 20);
    if default_max_tokens > max_tokens_limit {
        f.bad(
            "engine.default_max_tokens",
            format!("must be <= engine.max_tokens_limit ({max_tokens_limit}), got {default_max_tokens}"),
        );
    }
    let max_stop = f.count("engine.max_stop", 0, 1024);
    let kv_state_every = f.count("engine.kv_state_every", 0, 1 << 20);
    let spill_dir = match f.val("engine.spill_dir") {
        "" => std::env::temp_dir().join("pmkvq-spill"),
        p => PathBuf::from(p),
    };
    let spill_max_bytes = match parse_bytes(f.val("engine.spill_max_bytes")) {
        Some(0) => None,
        Some(n) => Some(n as u64),
        None => {
            let v = f.val("engine.spill_max_bytes");
            f.bad(
                "engine.spill_max_bytes",
                format!("must be a byte size such as 4GiB (0 = no limit), got `{v}`"),
            );
            None
        }
    };
    let reserve = f.count("engine.conclude_reserve", 1, 1 << 20);
    let conclude_reserve = match f.val("engine.on_memory_pressure") {
        "end" => None,
        "conclude" => Some(reserve),
        v => {
            f.bad(
                "engine.on_memory_pressure",
                format!("must be `end` or `conclude`, got `{v}`"),
            );
            None
        }
    };
    EngineSection {
        conclude_reserve,
        max_running,
        max_queued,
        prefill_chunk,
        stream_buffer,
        pause_timeout,
        prepare_threads,
        limits: RequestLimits {
            default_max_tokens,
            max_tokens_limit,
            max_stop,
            default_kv_method,
            default_kv_state_every: kv_state_every,
        },
        spill_dir,
        spill_max_bytes,
    }
}

struct MemorySection {
    cap: OperatorCap,
    policy: PolicyConfig,
    interval: Duration,
    root: PathBuf,
}

/// `memory.*`: the operator's cap, the policy that turns samples into a budget, sampling interval and root.
fn memory(f: &mut Fields<'_>) -> MemorySection {
    let cap = f.val("memory.budget").parse::<OperatorCap>().unwrap_or_else(|e| {
        f.bad("memory.budget", e);
        OperatorCap::Automatic
    });
    let reserve = parse_bytes(f.val("memory.reserve")).unwrap_or_else(|| {
        let v = f.val("memory.reserve");
        f.bad(
            "memory.reserve",
            format!("must be a byte size such as 256MiB, got `{v}`"),
        );
        0
    });
    let policy = PolicyConfig {
        reserve_bytes: reserve as u64,
        fraction: f.number("memory.fraction", 0.0, 1.0),
        pressure_some_pct: f.number("memory.pressure_some_pct", 0.0, 100.0),
        pressure_factor: 0.5,
        hysteresis: f.number("memory.hysteresis", 0.0, 0.5),
        min_interval: f.duration("memory.min_interval"),
        kv_on_device: false,
    };
    let interval = f.duration_at_least("memory.interval", Duration::from_millis(10));
    MemorySection {
        cap,
        policy,
        interval,
        root: PathBuf::from(f.val("memory.root")),
    }
}

/// `server.*`: connection and stream limits at the gRPC listener.
fn server(f: &mut Fields<'_>) -> EdgeLimits {
    let max_connections = f.count("server.max_connections", 1, 1 << 20);
    let max_streams_per_connection = f.count("server.max_streams_per_connection", 1, 65_535) as u32;
    let handshake_timeout = f.duration_at_least("server.handshake_timeout", Duration::from_millis(100));
    let keepalive_timeout = f.duration_at_least("server.keepalive_timeout", Duration::from_millis(100));
    let keepalive_interval = match f.duration("server.keepalive_interval") {
        d if d.is_zero() => None,
        d if d < Duration::from_millis(100) => {
            let v = f.val("server.keepalive_interval");
            f.bad(
                "server.keepalive_interval",
                format!("must be 0s (off) or >= 100ms, got `{v}`"),
            );
            None
        }
        d => Some(d),
    };
    EdgeLimits {
        max_connections,
        max_streams_per_connection,
        handshake_timeout,
        keepalive_interval,
        keepalive_timeout,
    }
}

/// `auth.*`: the admin token (inline or from a file) and whether a remote listener may go without one.
fn auth(f: &mut Fields<'_>, listen: &ListenAddr) -> Option<String> {
    let mut token = match (f.val("auth.token"), f.val("auth.token_file")) {
        ("", "") => None,
        (t, "") => Some(t.to_string()),
        ("", file) => match read_small(file, 4 << 10)
            .and_then(|b| String::from_utf8(b).map_err(|_| std::io::Error::other("not UTF-8")))
        {
            Ok(t) if !t.trim().is_empty() => Some(t.trim().to_string()),
            Ok(_) => {
                f.bad("auth.token_file", format!("{file} is empty"));
                None
            }
            Err(e) => {
                f.bad("auth.token_file", format!("cannot read {file}: {e}"));
                None
            }
        },
        _ => {
            f.bad("auth.token", "and `auth.token_file` are both set; use one".into());
            None
        }
    };
    if token.as_deref().is_some_and(|t| t.len() < 16) {
        f.bad("auth.token", "must be at least 16 characters".into());
        token = None;
    }
    let allow_remote = f.flag("auth.allow_insecure_remote");
    if let ListenAddr::Tcp(a) = listen {
        if !a.ip().is_loopback() && token.is_none() && !allow_remote {
            f.bad(
                "listen",
                format!(
                    "is {a}, reachable from other machines, but no `auth.token` protects the admin calls; set one, \
                     or set `auth.allow_insecure_remote = true`"
                ),
            );
        }
    }
    token
}

/// A file of at most `limit` bytes (a token or a PEM file): a path to a device or a huge file is an error, not a
/// read that never ends.
fn read_small(path: &str, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let mut buf = Vec::new();
    f.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::other(format!("larger than {limit} bytes")));
    }
    Ok(buf)
}

/// `tls.cert`, `tls.key`: PEM files, read now so a bad path stops the start.
fn tls(f: &mut Fields<'_>) -> Option<(Vec<u8>, Vec<u8>)> {
    match (f.val("tls.cert"), f.val("tls.key")) {
        ("", "") => None,
        (c, k) if !c.is_empty() && !k.is_empty() => match (read_small(c, 1 << 20), read_small(k, 1 << 20)) {
            (Ok(c), Ok(k)) => Some((c, k)),
            (Err(e), _) => {
                f.bad("tls.cert", format!("cannot read {c}: {e}"));
                None
            }
            (_, Err(e)) => {
                f.bad("tls.key", format!("cannot read {k}: {e}"));
                None
            }
        },
        _ => {
            f.bad("tls.cert", "and `tls.key` must be set together".into());
            None
        }
    }
}

/// `metrics.listen`: the Prometheus endpoint, off when empty.
fn metrics(f: &mut Fields<'_>) -> Option<SocketAddr> {
    match f.val("metrics.listen") {
        "" => None,
        v => v.parse::<SocketAddr>().map(Some).unwrap_or_else(|_| {
            f.bad(
                "metrics.listen",
                format!("must be HOST:PORT with an IP address, got `{v}`"),
            );
            None
        }),
    }
}

/// `http.*`: the OpenAI-compatible listener, off when `http.listen` is empty. A non-loopback address needs the
/// admin token, as `listen` does (the admin routes are served there too; a malformed `auth.allow_insecure_remote` is reported by `auth`).
fn http(f: &mut Fields<'_>, has_token: bool) -> HttpConfig {
    let listen = match f.val("http.listen") {
        "" => None,
        v => match v.parse::<SocketAddr>() {
            Ok(a) => Some(a),
            Err(_) => {
                f.bad(
                    "http.listen",
                    format!("must be HOST:PORT with an IP address (e.g. 127.0.0.1:8080), got `{v}`"),
                );
                None
            }
        },
    };
    if let Some(a) = listen {
        if !a.ip().is_loopback() && !has_token && f.val("auth.allow_insecure_remote") != "true" {
            f.bad(
                "http.listen",
                format!(
                    "is {a}, reachable from other machines, but no `auth.token` protects the admin routes; set one, \
                     or set `auth.allow_insecure_remote = true`"
                ),
            );
        }
    }
    let model_name = f.val("http.model_name").to_string();
    if model_name.len() > 256 || model_name.chars().any(|c| c.is_control()) {
        f.bad(
            "http.model_name",
            "must be at most 256 bytes without control characters".into(),
        );
    }
    HttpConfig {
        listen,
        model_name,
        metrics: f.flag("http.metrics"),
    }
}
