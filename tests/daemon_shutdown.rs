//! The real `pmkvqd` binary: SIGTERM turns health NOT_SERVING first, ends every active stream with a final
//! message within the grace period, and exits 0.

mod common;

use common::daemon::{collect_stream, text_request};
use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::process::{Child, Command};
use std::time::{Duration, Instant};
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

type Daemon = common::daemon::Pmkvqd;

async fn health_client(url: &str) -> Result<HealthClient<tonic::transport::Channel>, tonic::transport::Error> {
    let ch = tonic::transport::Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await?;
    Ok(HealthClient::new(ch))
}

async fn spawn_daemon(grace: &str) -> Daemon {
    common::daemon::spawn_pmkvqd(&[&format!("shutdown.grace={grace}")]).await
}

/// `n` streams (EOS ignored), each on its own connection, each past its first chunk.
async fn open_streams(url: &str, n: usize, max_tokens: u32) -> Vec<tonic::Streaming<pb::GenerateResponse>> {
    let mut streams = Vec::new();
    for i in 0..n {
        let mut c = PmkvqServiceClient::connect(url.to_string()).await.unwrap();
        let mut r = text_request(&format!("Story number {i}: once upon a time"), max_tokens);
        r.stopping.as_mut().unwrap().ignore_eos = Some(true);
        let mut s = c.generate(r).await.unwrap().into_inner();
        s.message().await.unwrap().expect("first chunk");
        streams.push(s);
    }
    streams
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -TERM");
}

async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(t0.elapsed() < limit, "pmkvqd still running {limit:?} after SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Four endless streams and a health watch; SIGTERM with a 2 s grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_cancels_active_streams_after_the_grace_period_and_exits_0() {
    let mut d = spawn_daemon("2s").await;
    let mut health = health_client(&d.url()).await.unwrap();
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "pmkvq.v1.PmkvqService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(watch.message().await.unwrap().unwrap().status(), ServingStatus::Serving);
    let streams = open_streams(&d.url(), 4, 8000).await;
    let t_term = Instant::now();
    sigterm(&d.child);
    let not_serving = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("health update within 5 s")
        .unwrap()
        .unwrap();
    assert_eq!(not_serving.status(), ServingStatus::NotServing);
    let t_health = t_term.elapsed();
    let mut ends = Vec::new();
    for s in streams {
        let got = collect_stream(s).await;
        ends.push((t_term.elapsed(), got));
    }
    for (at, got) in &ends {
        assert!(got.error.is_none(), "{:?}", got.error);
        assert_eq!(
            got.finish_reason(),
            pb::FinishReason::Cancelled,
            "cut at the end of the grace period"
        );
        assert!(*at > t_health, "health turned NOT_SERVING before any stream ended");
        assert!(!got.ids.is_empty());
    }
    let st = wait_exit(&mut d.child, Duration::from_secs(6)).await;
    assert!(st.success(), "exit status {st:?}");
    assert!(
        t_term.elapsed() < Duration::from_secs(6),
        "exited {:?} after SIGTERM",
        t_term.elapsed()
    );
}

/// Short streams finish normally during the drain; no new work is accepted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_short_streams_complete() {
    let mut d = spawn_daemon("30s").await;
    let streams = open_streams(&d.url(), 4, 48).await;
    let t_term = Instant::now();
    sigterm(&d.child);
    // New work is refused while draining (a new connection is not accepted, or the request is UNAVAILABLE).
    tokio::time::sleep(Duration::from_millis(100)).await;
    if let Ok(mut c) = PmkvqServiceClient::connect(d.url()).await {
        let st = c.generate(text_request("Hello", 4)).await.expect_err("draining");
        assert_eq!(st.code(), tonic::Code::Unavailable, "{}", st.message());
    }
    for s in streams {
        let got = collect_stream(s).await;
        assert_eq!(got.finish_reason(), pb::FinishReason::Length);
        assert_eq!(got.ids.len() + 1, 48, "the first chunk was read before SIGTERM");
    }
    let st = wait_exit(&mut d.child, Duration::from_secs(10)).await;
    assert!(st.success(), "exit status {st:?}");
    assert!(t_term.elapsed() < Duration::from_secs(10));
}
