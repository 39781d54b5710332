//! Requests racing a shutdown: every stream the server accepted ends with `complete` or `error`, never an empty
//! OK stream (a request that passed the draining check while the engine left its loop used to get one).

mod common;

use common::daemon::{start_server, start_server_with, text_request};
use pmkvq::engine::{FaultHook, FaultPoint};
use pmkvq::server::proto as pb;
use std::sync::Arc;
use std::time::Duration;

/// How an accepted stream ended.
#[derive(Debug, PartialEq)]
enum End {
    Final,
    /// The stream closed cleanly without a `complete` or `error` message.
    Empty,
    Transport(String),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn submits_racing_a_shutdown_all_end_with_a_final_message() {
    for round in 0..3 {
        let server = start_server(&[("engine.max_queued", "512"), ("shutdown.grace", "10s")]).await;
        let client = server.client().await;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let mut c = client.clone();
            tasks.push(tokio::spawn(async move {
                // spread the submits over the moment the shutdown starts
                tokio::time::sleep(Duration::from_micros((i % 50) * 200)).await;
                let mut s = match c.generate(text_request("Hello", 3)).await {
                    Ok(s) => s.into_inner(),
                    Err(_) => return None, // refused: never accepted
                };
                let mut last = None;
                loop {
                    match s.message().await {
                        Ok(Some(m)) => last = m.kind,
                        Ok(None) => {
                            return Some(match last {
                                Some(pb::generate_response::Kind::Complete(_))
                                | Some(pb::generate_response::Kind::Error(_)) => End::Final,
                                _ => End::Empty,
                            })
                        }
                        Err(st) => return Some(End::Transport(st.message().to_string())),
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(2 + 3 * round)).await;
        let stopping = tokio::spawn(server.stop());
        let mut accepted = 0;
        for t in tasks {
            if let Some(end) = t.await.unwrap() {
                accepted += 1;
                assert_eq!(
                    end,
                    End::Final,
                    "round {round}: an accepted stream ended without its last message"
                );
            }
        }
        stopping.await.unwrap();
        eprintln!("round {round}: {accepted} of 200 accepted, every one ended with complete or error");
    }
}

/// The race made deterministic with the fault hook's sleeps: a submission pauses after the draining check
/// while the engine, asked to drain, leaves its loop and pauses before its exit. The submission lands in the
/// command channel then; it used to be dropped with the channel (an empty OK stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submit_landing_while_the_engine_exits_still_gets_its_last_message() {
    let hook = FaultHook(Arc::new(|at, id| {
        match (at, id) {
            (FaultPoint::Submit, "slow") => std::thread::sleep(Duration::from_millis(1000)),
            (FaultPoint::EngineExit, _) => std::thread::sleep(Duration::from_millis(2000)),
            _ => {}
        }
        false
    }));
    let server = start_server_with(&[("shutdown.grace", "5s")], |c| c.fault = Some(hook)).await;
    let mut c = server.client().await;
    let slow = tokio::spawn(async move {
        let mut r = text_request("Hello", 3);
        r.request_id = "slow".into();
        c.generate(r).await
    });
    // generous margins for a loaded machine: the submit passes its draining check well before the drain
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopping = tokio::spawn(server.stop());
    match slow.await.unwrap() {
        Err(st) => panic!("the submission passed the draining check before the drain; refused with {st:?}"),
        Ok(s) => {
            let mut s = s.into_inner();
            let mut last = None;
            while let Some(m) = s.message().await.expect("the stream ends cleanly") {
                last = m.kind;
            }
            assert!(
                matches!(last, Some(pb::generate_response::Kind::Complete(_))),
                "the accepted stream must end with complete (cancelled) or error, got {last:?}"
            );
        }
    }
    stopping.await.unwrap();
}
