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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(pmkvq::app::run(cfg, pmkvq::server::Listener::Tcp(listener), async {
        let _ = rx.await;
    }));
    let server = TestServer {
        addr,
        stop: Some(tx),
        task: Some(task),
    };
    server.wait_ready().await;
    server
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
    async fn wait_ready(&self) {
        let t0 = Instant::now();
        loop {
            if let Ok(mut c) = PmkvqServiceClient::connect(self.url()).await {
                if let Ok(s) = c.get_status(pb::GetStatusRequest {}).await {
                    if s.into_inner().ready && serving(&self.url()).await {
                        return;
                    }
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "server not ready after 60 s");
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
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    let ask = async {
        let ch = Channel::from_shared(url.to_string())
            .expect("a valid url")
            .connect()
            .await
            .ok()?;
        let r = HealthClient::new(ch)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .ok()?;
        Some(r.into_inner().status == ServingStatus::Serving as i32)
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), ask).await, Ok(Some(true)))
}

/// The real `pmkvqd` binary (its own runtime) on a loopback port; killed when dropped.
pub struct Pmkvqd {
    pub child: std::process::Child,
    pub port: u16,
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
    for _ in 0..5 {
        let port = super::http::free_port();
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
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start pmkvqd");
        let mut d = Pmkvqd { child, port };
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
