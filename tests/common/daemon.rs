//! Start pmkvqd in-process on 127.0.0.1:0 through the same `app::run` the binary uses, and talk to it with the
//! generated tonic client.

use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

pub type Client = PmkvqServiceClient<Channel>;

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), pmkvq::app::AppError>>>,
}

/// The default model with the given config overrides (`--set key=value` pairs).
pub async fn start_server(overrides: &[(&str, &str)]) -> TestServer {
    let model = super::default_model_path();
    let model = model.to_str().unwrap().to_string();
    let mut pairs = vec![("model", model.as_str())];
    pairs.extend_from_slice(overrides);
    let cfg = pmkvq::config::from_pairs(&pairs).expect("test config is valid");
    start_server_config(cfg).await
}

/// Another model file with the given config overrides.
pub async fn start_server_model(model: &std::path::Path, overrides: &[(&str, &str)]) -> TestServer {
    let model = model.to_str().unwrap().to_string();
    let mut pairs = vec![("model", model.as_str())];
    pairs.extend_from_slice(overrides);
    let cfg = pmkvq::config::from_pairs(&pairs).expect("test config is valid");
    start_server_config(cfg).await
}

/// The default model with the config overrides and then `edit` applied to the typed config (settings no file
/// can express, such as a fault hook).
pub async fn start_server_with(
    overrides: &[(&str, &str)],
    edit: impl FnOnce(&mut pmkvq::config::Config),
) -> TestServer {
    let model = super::default_model_path();
    let model = model.to_str().unwrap().to_string();
    let mut pairs = vec![("model", model.as_str())];
    pairs.extend_from_slice(overrides);
    let mut cfg = pmkvq::config::from_pairs(&pairs).expect("test config is valid");
    edit(&mut cfg);
    start_server_config(cfg).await
}

async fn start_server_config(cfg: pmkvq::config::Config) -> TestServer {
    launch(cfg)
        .await
        .unwrap_or_else(|e| panic!("app::run ended at start: {e}"))
}

/// Spawn `app::run` on `cfg` with gRPC on a fresh loopback port and wait until it is ready; the app's error when
/// it ends first.
pub async fn launch(cfg: pmkvq::config::Config) -> Result<TestServer, pmkvq::app::AppError> {
    let mut server = spawn_app(cfg).await;
    server.wait_ready().await?;
    Ok(server)
}

/// `app::run` on `cfg` with gRPC on a fresh loopback port, not waited for.
async fn spawn_app(cfg: pmkvq::config::Config) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pmkvq::app::run(cfg, pmkvq::server::Listener::Tcp(listener), async {
        let _ = rx.await;
    }));
    TestServer {
        addr,
        stop: Some(tx),
        task: Some(task),
    }
}

/// Whether `e` says the free port found for `addr` was taken before the app bound it: `free_port()` releases the
/// port, and a parallel test's client connection can take it as its ephemeral port in between.
pub fn lost_port(e: &pmkvq::app::AppError, addr: &str) -> bool {
    matches!(e, pmkvq::app::AppError::Bind(a, io) if a == addr && io.kind() == std::io::ErrorKind::AddrInUse)
}

/// The default model with the OpenAI HTTP API on a free loopback port, `overrides` and then `edit`, once ready:
/// the server and its HTTP address.
pub async fn start_server_http(
    overrides: &[(&str, &str)],
    edit: impl Fn(&mut pmkvq::config::Config),
) -> (TestServer, String) {
    let model = super::default_model_path();
    let model = model.to_str().unwrap().to_string();
    let (mut server, http) = spawn_http(|http| {
        let mut pairs = vec![("model", model.as_str()), ("http.listen", http)];
        pairs.extend_from_slice(overrides);
        let mut cfg = pmkvq::config::from_pairs(&pairs).expect("test config is valid");
        edit(&mut cfg);
        cfg
    })
    .await;
    server.ready().await;
    (server, http)
}

/// `app::run` on `cfg(http)` for a free loopback address `http`, returned as soon as the HTTP listener is bound,
/// before the model loads: once gRPC health answers at all (the app binds `http.listen` before it serves gRPC;
/// with `tls` set, over TLS with its certificate as the root, for `localhost`). A server whose port was taken
/// before it bound it ([`lost_port`]) starts again on another, five times at most.
pub async fn spawn_http(cfg: impl Fn(&str) -> pmkvq::config::Config) -> (TestServer, String) {
    for _ in 0..5 {
        let http = super::http::free_address();
        let cfg = cfg(&http);
        let ca = cfg.tls.as_ref().map(|(cert, _)| cert.clone());
        let mut server = spawn_app(cfg).await;
        let url = match ca {
            Some(_) => format!("https://{}", server.addr),
            None => server.url(),
        };
        let bound = server
            .wait_for(&format!("{http} bound"), || async {
                health_status(&url, ca.as_deref()).await.is_some()
            })
            .await;
        match bound {
            Ok(()) => return (server, http),
            Err(e) if lost_port(&e, &http) => eprintln!("{e}; again on another port"),
            Err(e) => panic!("app::run ended at start: {e}"),
        }
    }
    panic!("the HTTP port was taken five times");
}

impl TestServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> Client {
        PmkvqServiceClient::connect(self.url()).await.expect("connect")
    }

    /// Ready as a load balancer sees it: the engine is warm (`GetStatus.ready`) and health says SERVING (the app
    /// sets it just after the engine reports ready; a test that checks health must not start in between).
    /// Clear-text gRPC only.
    pub async fn ready(&mut self) {
        if let Err(e) = self.wait_ready().await {
            panic!("app::run ended at start: {e}");
        }
    }

    /// Wait until GetStatus says ready and health SERVING; the app's error when `app::run` ends first.
    async fn wait_ready(&mut self) -> Result<(), pmkvq::app::AppError> {
        let url = self.url();
        self.wait_for("server ready", || async {
            let Ok(mut c) = PmkvqServiceClient::connect(url.clone()).await else {
                return false;
            };
            let ready = c
                .get_status(pb::GetStatusRequest {})
                .await
                .is_ok_and(|s| s.into_inner().ready);
            ready && serving(&url).await
        })
        .await
    }

    /// Poll `up` every 50 ms until it holds (panics after 60 s); the app's error when `app::run` ends first.
    async fn wait_for<F: std::future::Future<Output = bool>>(
        &mut self,
        what: &str,
        up: impl Fn() -> F,
    ) -> Result<(), pmkvq::app::AppError> {
        let t0 = Instant::now();
        loop {
            if self.task.as_ref().is_some_and(|t| t.is_finished()) {
                let t = self.task.take().expect("checked");
                t.await.expect("app task")?;
                panic!("app::run returned Ok before {what}");
            }
            if up().await {
                return Ok(());
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "still waiting for {what} after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait for `app::run` to return by itself (no shutdown sent) and give its result.
    pub async fn ended(mut self) -> Result<(), pmkvq::app::AppError> {
        let t = self.task.take().expect("not yet ended");
        tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .expect("app::run returns within 30 s")
            .expect("app task")
    }

    /// Trigger shutdown and wait for `app::run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("app task").expect("app::run ends cleanly");
        }
    }
}

/// Server status.
pub async fn status(c: &mut Client) -> pb::ServerStatus {
    c.get_status(pb::GetStatusRequest {})
        .await
        .expect("GetStatus")
        .into_inner()
}

/// Poll GetStatus until `pred` holds (panics after `limit`).
pub async fn wait_status(
    c: &mut Client,
    limit: Duration,
    pred: impl Fn(&pb::ServerStatus) -> bool,
) -> pb::ServerStatus {
    let t0 = Instant::now();
    loop {
        let s = status(c).await;
        if pred(&s) {
            return s;
        }
        assert!(
            t0.elapsed() < limit,
            "condition not reached within {limit:?}; last status {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A greedy request from chat messages.
pub fn chat_request(messages: &[(&str, &str)], max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
            messages: messages
                .iter()
                .map(|(r, c)| pb::ChatMessage {
                    role: r.to_string(),
                    content: c.to_string(),
                })
                .collect(),
        })),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn text_request(text: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(text.to_string())),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: Some(max_tokens),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A finished stream, collected.
#[derive(Debug, Default)]
pub struct Collected {
    pub request_id: String,
    pub ids: Vec<u32>,
    pub text: String,
    pub kv_states: Vec<(usize, pb::KvState)>,
    pub complete: Option<pb::Complete>,
    pub error: Option<String>,
    pub messages: usize,
}

impl Collected {
    pub fn finish_reason(&self) -> pb::FinishReason {
        pb::FinishReason::try_from(self.complete.as_ref().expect("completed").finish_reason).unwrap()
    }
}

/// Run a request to the end.
pub async fn collect(c: &mut Client, req: pb::GenerateRequest) -> Collected {
    let stream = c.generate(req).await.expect("Generate accepted").into_inner();
    collect_stream(stream).await
}

pub async fn collect_stream(mut stream: tonic::Streaming<pb::GenerateResponse>) -> Collected {
    let mut out = Collected::default();
    while let Some(m) = stream.message().await.expect("stream message") {
        assert!(
            out.complete.is_none() && out.error.is_none(),
            "message after the final one"
        );
        out.messages += 1;
        if out.request_id.is_empty() {
            out.request_id = m.request_id.clone();
        }
        assert_eq!(
            out.request_id, m.request_id,
            "request_id must be echoed on every message"
        );
        match m.kind.expect("kind set") {
            pb::generate_response::Kind::Chunk(ch) => {
                out.ids.extend_from_slice(&ch.token_ids);
                out.text.push_str(&ch.text);
                if let Some(kv) = ch.kv {
                    out.kv_states.push((out.ids.len(), kv));
                }
            }
            pb::generate_response::Kind::Complete(cm) => out.complete = Some(cm),
            pb::generate_response::Kind::Error(e) => out.error = Some(e.message),
        }
    }
    out
}

/// Whether gRPC health (the whole server) at `url` says SERVING, asked with a 2 s deadline.
pub async fn serving(url: &str) -> bool {
    health_status(url, None).await == Some(true)
}

/// gRPC health (the whole server) at `url`, asked with a 2 s deadline, over TLS with `ca` as the only root when
/// given: whether it says SERVING, or `None` when it does not answer.
pub async fn health_status(url: &str, ca: Option<&[u8]>) -> Option<bool> {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let ask = async {
        let mut ch = Channel::from_shared(url.to_string()).expect("a valid url");
        if let Some(ca) = ca {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost");
            ch = ch.tls_config(tls).expect("a valid TLS config");
        }
        let ch = ch.connect().await.ok()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .ok()?;
        Some(r.into_inner().status == ServingStatus::Serving as i32)
    };
    tokio::time::timeout(Duration::from_secs(2), ask).await.ok().flatten()
}

/// The real `pmkvqd` binary (its own runtime) on a loopback port; killed when dropped.
pub struct Pmkvqd {
    pub child: std::process::Child,
    pub port: u16,
    /// The `/metrics` port, when started by [`spawn_pmkvqd_with_metrics`].
    pub metrics_port: Option<u16>,
}

impl Pmkvqd {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Pmkvqd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Start `pmkvqd` on the default model with `log.filter=warn` and `sets` (`--set` pairs) on a free port, and
/// return it once health says SERVING. A port found free can be taken before the daemon binds it (a parallel
/// test's client connection takes its ephemeral port from the same range): a daemon that exits at start is
/// started again on another port, five times at most.
pub async fn spawn_pmkvqd(sets: &[&str]) -> Pmkvqd {
    spawn_pmkvqd_ports(sets, false).await
}

/// [`spawn_pmkvqd`] with `metrics.listen` on a free port too (both chosen again when the daemon exits at start).
pub async fn spawn_pmkvqd_with_metrics(sets: &[&str]) -> Pmkvqd {
    spawn_pmkvqd_ports(sets, true).await
}

async fn spawn_pmkvqd_ports(sets: &[&str], metrics: bool) -> Pmkvqd {
    for _ in 0..5 {
        let port = super::http::free_port();
        let metrics_port = metrics.then(super::http::free_port);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pmkvqd"));
        cmd.arg("--model").arg(super::default_model_path()).args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--set",
            "log.filter=warn",
        ]);
        for s in sets {
            cmd.args(["--set", s]);
        }
        if let Some(m) = metrics_port {
            cmd.args(["--set", &format!("metrics.listen=127.0.0.1:{m}")]);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start pmkvqd");
        let mut d = Pmkvqd {
            child,
            port,
            metrics_port,
        };
        let t0 = Instant::now();
        loop {
            if serving(&d.url()).await {
                return d;
            }
            if let Some(status) = d.child.try_wait().expect("poll pmkvqd") {
                eprintln!("pmkvqd exited at start ({status}); again on another port");
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "pmkvqd did not become SERVING");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    panic!("pmkvqd exited at start five times");
}
