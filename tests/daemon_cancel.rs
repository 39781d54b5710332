//! Cancellation is a dropped stream: the engine frees the sequence's KV cache at its next step, during decode or
//! in the middle of a long prefill, and nothing is left behind after many cancels.

mod common;

use common::daemon::{collect, start_server, status, text_request, wait_status};
use pmkvq::server::proto as pb;
use std::time::Duration;

fn endless(text: &str) -> pb::GenerateRequest {
    let mut r = text_request(text, 4000);
    r.stopping.as_mut().unwrap().ignore_eos = Some(true);
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_stream_frees_kv_within_one_step() {
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    let mut stream = c.generate(endless("Tell me a long story.")).await.unwrap().into_inner();
    for _ in 0..5 {
        stream.message().await.unwrap().unwrap();
    }
    let running = status(&mut c).await;
    assert_eq!(running.running, 1);
    assert!(running.kv_true_bytes > 0);
    drop(stream);
    let seen = status(&mut c).await;
    let gone = wait_status(&mut c, Duration::from_secs(5), |s| s.sequences.is_empty()).await;
    assert_eq!(gone.kv_true_bytes, 0);
    // The sequence is gone at most one forward pass after the first snapshot taken once the client left.
    assert!(
        gone.steps <= seen.steps + 1,
        "freed after {} more steps",
        gone.steps - seen.steps
    );
    // And the engine is idle afterwards: no more forward passes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(status(&mut c).await.steps, gone.steps);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_cancels_leak_nothing() {
    let server = start_server(&[("engine.max_running", "8")]).await;
    let mut c = server.client().await;
    let baseline = collect(&mut c, text_request("The capital of France is", 16)).await;
    // 100 streams, ten at a time, each dropped after its first token (some while still queued or prefilling).
    for round in 0..10 {
        let mut streams = Vec::new();
        for i in 0..10 {
            let s = c
                .generate(endless(&format!("Story {round}-{i}: once upon a time")))
                .await
                .unwrap()
                .into_inner();
            streams.push(s);
        }
        for (i, mut s) in streams.into_iter().enumerate() {
            if i % 2 == 0 {
                let first = s.message().await.unwrap().unwrap();
                assert!(matches!(first.kind, Some(pb::generate_response::Kind::Chunk(_))));
            }
            drop(s);
        }
    }
    let idle = wait_status(&mut c, Duration::from_secs(10), |s| s.sequences.is_empty()).await;
    assert_eq!(idle.kv_true_bytes, 0);
    assert_eq!(idle.queued, 0);
    // Every cancelled request released its queue slot: a full queue's worth still fits.
    let again = collect(&mut c, text_request("The capital of France is", 16)).await;
    assert_eq!(
        again.ids, baseline.ids,
        "the daemon serves the same answer after 100 cancels"
    );
    assert!(idle.completed_requests >= 100, "{idle:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_during_a_long_prefill_stops_the_prefill() {
    // Small prefill chunks so the prompt takes many steps.
    let server = start_server(&[("engine.prefill_chunk", "64")]).await;
    let mut c = server.client().await;
    let text = std::fs::read_to_string(common::shared_dir().join("data/text/botchan.txt")).unwrap();
    let prompt: String = text.chars().skip(5000).take(24_000).collect();
    let stream = c.generate(text_request(&prompt, 8)).await.unwrap().into_inner();
    let started = wait_status(&mut c, Duration::from_secs(30), |s| {
        s.sequences.first().is_some_and(|q| q.prefilled_tokens >= 128)
    })
    .await;
    let prompt_tokens = started.sequences[0].prompt_tokens;
    assert!(prompt_tokens > 4000, "the prompt must be long: {prompt_tokens} tokens");
    drop(stream);
    let seen = status(&mut c).await;
    let gone = wait_status(&mut c, Duration::from_secs(5), |s| s.sequences.is_empty()).await;
    assert!(
        gone.steps <= seen.steps + 1,
        "prefill went on for {} steps",
        gone.steps - seen.steps
    );
    let filled = seen.sequences.first().map_or(0, |q| q.prefilled_tokens);
    assert!(
        filled < prompt_tokens,
        "cancelled after {filled} of {prompt_tokens} prompt tokens: the prefill was stopped"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let later = status(&mut c).await;
    assert_eq!(later.steps, gone.steps, "no forward passes after the cancel");
    assert_eq!(later.kv_true_bytes, 0);
    server.stop().await;
}
