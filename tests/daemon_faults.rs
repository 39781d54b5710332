//! Internal faults, injected as real panics in the real engine loop (the test-only `FaultHook`): a panic inside
//! a step ends that step's sequences with `error` and the engine goes on; one the engine cannot contain turns
//! health NOT_SERVING and ends the daemon with an error (so systemd or Kubernetes restarts it); a failed warm-up
//! fails the start.

mod common;

use common::daemon::{collect, collect_stream, start_server_with, status, text_request, wait_status};
use pmkvq::engine::{FaultHook, FaultPoint};
use std::sync::Arc;
use std::time::Duration;
use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};

fn hook(at: FaultPoint, id: &'static str) -> Option<FaultHook> {
    Some(FaultHook(Arc::new(move |p, r| p == at && r == id)))
}

fn named(id: &str, max_tokens: u32) -> pmkvq::server::proto::GenerateRequest {
    let mut r = text_request("Once upon a time", max_tokens);
    r.request_id = id.into();
    r
}

async fn health(url: String) -> i32 {
    let ch = tonic::transport::Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("health connects");
    let mut h = HealthClient::new(ch);
    h.check(HealthCheckRequest { service: String::new() })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(ServingStatus::Unknown as i32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_inside_a_step_ends_that_step_and_the_engine_goes_on() {
    let server = start_server_with(&[], |c| c.fault = hook(FaultPoint::Step, "boom")).await;
    let mut c = server.client().await;
    let got = collect(&mut c, named("boom", 8)).await;
    let err = got.error.expect("the faulted request ends with an error");
    assert!(err.contains("internal error in this step"), "{err}");
    assert!(got.complete.is_none());
    // The engine goes on: health SERVING, the next request completes, nothing is left behind.
    assert_eq!(health(server.url()).await, ServingStatus::Serving as i32);
    let ok = collect(&mut c, named("fine", 8)).await;
    assert_eq!(ok.ids.len(), 8, "{:?}", ok.error);
    wait_status(&mut c, Duration::from_secs(5), |s| {
        s.sequences.is_empty() && s.kv_true_bytes == 0
    })
    .await;
    assert!(status(&mut c).await.ready);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_the_engine_cannot_contain_stops_the_daemon_with_an_error() {
    let server = start_server_with(&[], |c| c.fault = hook(FaultPoint::Housekeeping, "fatal")).await;
    let mut c = server.client().await;
    let bystander = c.generate(named("bystander", 4000)).await.unwrap().into_inner();
    wait_status(&mut c, Duration::from_secs(10), |s| s.running == 1).await;
    let fatal = c.generate(named("fatal", 8)).await.unwrap().into_inner();
    let (a, b) = tokio::join!(collect_stream(bystander), collect_stream(fatal));
    for got in [a, b] {
        let err = got.error.expect("every stream ends with an error");
        assert!(err.contains("the engine failed"), "{err}");
    }
    let e = server.ended().await.expect_err("app::run ends with an error");
    assert!(matches!(e, pmkvq::app::AppError::Engine(_)), "{e}");
    assert_eq!(e.exit_code(), 70);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_during_warm_up_fails_the_start() {
    let mut cfg = pmkvq::config::from_pairs(&[("model", common::default_model_path().to_str().unwrap())]).unwrap();
    cfg.fault = hook(FaultPoint::WarmUp, "");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let run = pmkvq::app::run(cfg, pmkvq::server::Listener::Tcp(listener), std::future::pending());
    let e = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("the start ends by itself")
        .expect_err("a failed warm-up is an error (pmkvqd exits non-zero), not a clean exit");
    assert!(e.to_string().contains("warm-up"), "{e}");
    assert_ne!(e.exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_error_in_one_sequence_ends_only_that_sequence() {
    let server = start_server_with(&[], |c| c.fault = hook(FaultPoint::StoreError, "bad")).await;
    let mut c = server.client().await;
    let long = |id: &str| {
        let mut r = named(id, 48);
        r.stopping.as_mut().unwrap().ignore_eos = Some(true);
        r
    };
    let alone = collect(&mut c, long("alone")).await;
    assert_eq!(alone.ids.len(), 48, "{:?}", alone.error);
    // The same request again, and while it decodes, one whose cache fails half-way through the layers of the
    // step they share: its neighbour's cache already holds that step's first layers.
    let mut neighbour = c.generate(long("neighbour")).await.unwrap().into_inner();
    let mut ids = match neighbour.message().await.unwrap().expect("first chunk").kind {
        Some(pmkvq::server::proto::generate_response::Kind::Chunk(ch)) => ch.token_ids,
        other => panic!("expected a chunk, got {other:?}"),
    };
    let bad = collect(&mut c, named("bad", 8)).await;
    let err = bad.error.expect("the failing sequence ends with an error");
    assert!(
        err.contains("forward pass failed") && err.contains("fault injected"),
        "{err}"
    );
    let rest = collect_stream(neighbour).await;
    assert!(rest.error.is_none(), "the neighbour goes on: {:?}", rest.error);
    ids.extend_from_slice(&rest.ids);
    assert_eq!(ids, alone.ids, "the neighbour's tokens are those it makes alone");
    wait_status(&mut c, Duration::from_secs(5), |s| {
        s.sequences.is_empty() && s.kv_true_bytes == 0
    })
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_s_complete_arrives_only_after_the_status_no_longer_shows_it() {
    // A slow publish widens the window between a step and the status that reports it: a client that has its
    // `complete` and then asks for the status must not find the sequence (or its cache) still there.
    let slow_publish = FaultHook(Arc::new(|at, _| {
        if at == FaultPoint::Publish {
            std::thread::sleep(Duration::from_millis(150));
        }
        false
    }));
    let server = start_server_with(&[], |c| c.fault = Some(slow_publish)).await;
    let mut c = server.client().await;
    for round in 0..3 {
        let got = collect(&mut c, named(&format!("r{round}"), 3)).await;
        assert!(got.complete.is_some(), "{:?}", got.error);
        let s = status(&mut c).await;
        assert!(
            s.sequences.is_empty() && s.kv_true_bytes == 0,
            "round {round}: the status after `complete` still shows the sequence: {s:?}"
        );
    }
    server.stop().await;
}
