//! Transports besides plaintext loopback TCP: TLS with a generated certificate, and a unix socket (used by a
//! stock grpcio client).

mod common;

use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

async fn run_app(
    overrides: &[(&str, &str)],
    listener: pmkvq::server::Listener,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), pmkvq::app::AppError>>,
) {
    let model = common::default_model_path();
    let model = model.to_str().unwrap().to_string();
    let mut pairs = vec![("model", model.as_str())];
    pairs.extend_from_slice(overrides);
    let cfg = pmkvq::config::from_pairs(&pairs).expect("valid config");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pmkvq::app::run(cfg, listener, async {
        let _ = rx.await;
    }));
    (tx, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_generated_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let cert_pem = cert.cert.pem();
    std::fs::write(&cert_path, &cert_pem).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, task) = run_app(
        &[
            ("tls.cert", cert_path.to_str().unwrap()),
            ("tls.key", key_path.to_str().unwrap()),
        ],
        pmkvq::server::Listener::Tcp(listener),
    )
    .await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let t0 = Instant::now();
    let mut c = loop {
        let ch = Channel::from_shared(format!("https://127.0.0.1:{port}"))
            .unwrap()
            .tls_config(tls.clone())
            .unwrap()
            .connect()
            .await;
        if let Ok(ch) = ch {
            let mut c = PmkvqServiceClient::new(ch);
            if c.get_status(pb::GetStatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().ready)
            {
                break c;
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "TLS server not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let got = common::daemon::collect(&mut c, common::daemon::text_request("Hello", 4)).await;
    assert_eq!(got.ids.len(), 4);
    // A plaintext client gets nothing from a TLS port.
    let mut plain = PmkvqServiceClient::connect(format!("http://127.0.0.1:{port}"))
        .await
        .unwrap();
    assert!(plain.get_status(pb::GetStatusRequest {}).await.is_err());
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_with_a_stock_grpcio_client() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("pmkvqd.sock");
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    let (stop, task) = run_app(&[], pmkvq::server::Listener::Unix(listener)).await;
    let python = std::env::var("PMKVQ_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/clients/python/pmkvq_client.py");
    let target = format!("unix:{}", sock.display());
    let out = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        loop {
            let out = std::process::Command::new(&python)
                .args([
                    script,
                    "--server",
                    &target,
                    "--prompt",
                    "Hello",
                    "--max-tokens",
                    "4",
                    "--json",
                ])
                .output()
                .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
            // Health is NOT_SERVING (exit 69) while the model loads.
            if out.status.code() != Some(69) || t0.elapsed() > Duration::from_secs(60) {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["ids"].as_array().unwrap().len(), 4);
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_metrics_endpoint() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let server = common::daemon::start_server(&[("metrics.listen", &addr)]).await;
    let mut c = server.client().await;
    let got = common::daemon::collect(&mut c, common::daemon::text_request("Hello there", 5)).await;
    assert_eq!(got.ids.len(), 5);
    let get = |path: &'static str| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(&addr).unwrap();
            write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
    };
    let text = get("/metrics").await.unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK"), "{text}");
    for needle in [
        "pmkvq_requests_finished_total{reason=\"length\"} 1",
        "pmkvq_generated_tokens_total 5",
        "pmkvq_ttft_seconds_count 1",
        "pmkvq_kv_budget_bytes{source=\"host\"}",
        "pmkvq_memory_host_available_bytes",
        "pmkvq_requantizations_total 0",
        "pmkvq_preemptions_total 0",
        // the model runs on the CPU here: no weights in device memory
        "pmkvq_device_weight_bytes{device=\"cpu\"} 0",
    ] {
        assert!(text.contains(needle), "`{needle}` missing:\n{text}");
    }
    assert!(get("/other").await.unwrap().starts_with("HTTP/1.1 404"));
    server.stop().await;
}
