//! Prometheus text exposition (format 0.0.4) on its own port, off by default: `GET /metrics`.
//!
//! A deliberately small HTTP/1.1 responder (one request per connection, 8 KiB request limit, 5 s read timeout,
//! 16 connections at once, back-off when out of descriptors): scrapers need nothing more, and it keeps an HTTP
//! framework out of the daemon.

use crate::engine::{EngineHandle, EngineStatus};
use crate::memory::Budget;
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio_stream::StreamExt;

const MAX_REQUEST: usize = 8 << 10;
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrape connections open at once.
const MAX_CONNECTIONS: usize = 16;

/// One metric family: HELP, TYPE and its samples (`labels` like `{layer="3"}`, or empty).
fn family(o: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(o, "# HELP pmkvq_{name} {help}\n# TYPE pmkvq_{name} {kind}");
    for (labels, v) in samples {
        let _ = writeln!(o, "pmkvq_{name}{labels} {v}");
    }
}

/// The exposition text for one status snapshot and budget.
pub fn render(st: &EngineStatus, b: &Budget, model: &crate::engine::ModelSummary) -> String {
    let layers = model.layers;
    let mut o = String::new();
    let mut metric =
        |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| family(&mut o, name, kind, help, samples);
    let one = |v: f64| vec![(String::new(), v)];
    let finished: Vec<(String, f64)> = st
        .finish_counts
        .iter()
        .map(|(r, n)| (format!("{{reason=\"{r}\"}}"), *n as f64))
        .collect();
    metric(
        "requests_finished_total",
        "counter",
        "Finished requests by reason.",
        &finished,
    );
    metric(
        "device_weight_bytes",
        "gauge",
        "Bytes of model weights in device memory (0 when the model runs on the CPU); the KV gauges count device bytes then.",
        &[(
            format!("{{device=\"{}\"}}", model.device.replace(['"', '\\', '\n'], "_")),
            model.device_weight_bytes as f64,
        )],
    );
    metric(
        "requests_running",
        "gauge",
        "Sequences in the batch.",
        &one(st.running() as f64),
    );
    metric(
        "requests_queued",
        "gauge",
        "Accepted requests waiting for a slot.",
        &one(st.queued() as f64),
    );
    metric(
        "requests_preempted",
        "gauge",
        "Sequences spilled to disk.",
        &one(st.preempted() as f64),
    );
    metric(
        "generated_tokens_total",
        "counter",
        "Tokens generated (rate() gives tokens/s).",
        &one(st.generated_tokens as f64),
    );
    metric(
        "engine_steps_total",
        "counter",
        "Batched forward passes.",
        &one(st.steps as f64),
    );
    // TTFT is a summary (sum and count), not plain samples.
    metric(
        "ttft_seconds",
        "summary",
        "Time to first token.",
        &[
            ("_sum".to_string(), st.ttft_sum_s),
            ("_count".to_string(), st.ttft_count as f64),
        ],
    );
    metric(
        "kv_bytes",
        "gauge",
        "KV cache true bytes held, all sequences.",
        &one(st.kv_true_bytes as f64),
    );
    // The source of the budget the caches were fitted to (the engine's), not the monitor's newest figure.
    let src = st.budget_source.as_str();
    metric(
        "kv_budget_bytes",
        "gauge",
        "KV budget in force, labelled with what sets it.",
        &[(format!("{{source=\"{src}\"}}"), st.budget_bytes as f64)],
    );
    // Mean storage width per layer over the sequences that hold a cache.
    let holders: Vec<&Vec<u32>> = st
        .sequences
        .iter()
        .map(|s| &s.kv.layer_bits)
        .filter(|b| b.len() == layers)
        .collect();
    let bits: Vec<(String, f64)> = (0..layers)
        .filter(|_| !holders.is_empty())
        .map(|l| {
            let mean = holders.iter().map(|b| b[l] as f64).sum::<f64>() / holders.len() as f64;
            (format!("{{layer=\"{l}\"}}"), mean)
        })
        .collect();
    metric(
        "layer_bits",
        "gauge",
        "Mean KV storage bit-width per layer over running sequences.",
        &bits,
    );
    metric(
        "requantizations_total",
        "counter",
        "Layer bodies lowered one level (Equivalent Right Shift).",
        &one(st.requantizations as f64),
    );
    metric(
        "preemptions_total",
        "counter",
        "Sequences spilled to disk.",
        &one(st.preemptions as f64),
    );
    metric(
        "resumptions_total",
        "counter",
        "Spilled sequences resumed.",
        &one(st.resumptions as f64),
    );
    let m = &b.sample;
    metric(
        "memory_host_total_bytes",
        "gauge",
        "MemTotal.",
        &one(m.host_total as f64),
    );
    metric(
        "memory_host_available_bytes",
        "gauge",
        "MemAvailable.",
        &one(m.host_available as f64),
    );
    let opt = |v: Option<f64>| v.map(|x| vec![(String::new(), x)]).unwrap_or_default();
    metric(
        "memory_cgroup_max_bytes",
        "gauge",
        "cgroup memory.max.",
        &opt(m.cgroup_max.map(|v| v as f64)),
    );
    metric(
        "memory_cgroup_current_bytes",
        "gauge",
        "cgroup memory.current.",
        &opt(m.cgroup_current.map(|v| v as f64)),
    );
    metric(
        "memory_psi_some_avg10",
        "gauge",
        "PSI memory some avg10 (%).",
        &opt(m.psi_some_avg10),
    );
    metric(
        "memory_device_free_bytes",
        "gauge",
        "Device free memory.",
        &opt(m.device.map(|d| d.free as f64)),
    );
    o
}

/// Serve `/metrics` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    engine: Arc<OnceLock<EngineHandle>>,
    budget: watch::Receiver<Budget>,
) {
    // Scrapes are one short request each: a few at a time is plenty, and the cap (with the read timeout) keeps a
    // flood of idle connections from taking the process's descriptors.
    let limits = super::edge::AcceptLimits {
        max_connections: MAX_CONNECTIONS,
        handshake_timeout: None,
    };
    let mut conns = super::edge::incoming(listener, limits, "metrics");
    while let Some(conn) = conns.next().await {
        let Ok(mut sock) = conn else { continue };
        let engine = engine.clone();
        let budget = budget.clone();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(1024);
            let mut chunk = [0u8; 1024];
            let read = tokio::time::timeout(READ_TIMEOUT, async {
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST {
                    match sock.read(&mut chunk).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                true
            })
            .await;
            if !matches!(read, Ok(true)) {
                return;
            }
            let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
            let (code, body) = match (line.starts_with(b"GET /metrics "), engine.get()) {
                (true, Some(e)) => {
                    let b = budget.borrow().clone();
                    ("200 OK", render(&e.status(), &b, e.model_info()))
                }
                (true, None) => ("503 Service Unavailable", "loading the model\n".to_string()),
                (false, _) => ("404 Not Found", "only GET /metrics\n".to_string()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
