//! Clients that stop reading (a tiny HTTP/2 window, a long generation) pause only themselves: a paused sequence
//! gives its batch slot up, so eight of them cannot starve a small request, and after `engine.pause_timeout` they
//! end and free their caches.

mod common;

use common::daemon::{collect, start_server, status, text_request, wait_status, Client, TestServer};
use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::time::Duration;

/// Eight generations on connections with a 64-byte stream window that are never read, all paused.
async fn eight_mute_streams(server: &TestServer, c: &mut Client) -> Vec<impl Sized> {
    let mut mute = Vec::new();
    for i in 0..8 {
        let ch = tonic::transport::Endpoint::from_shared(server.url())
            .unwrap()
            .initial_stream_window_size(Some(64))
            .connect()
            .await
            .unwrap();
        let mut m = PmkvqServiceClient::new(ch);
        let mut r = text_request("Once upon a time", 4000);
        r.request_id = format!("mute-{i}");
        r.stopping.as_mut().unwrap().ignore_eos = Some(true);
        let stream = m.generate(r).await.unwrap().into_inner();
        mute.push((m, stream));
    }
    let paused = pb::SequenceState::Paused as i32;
    wait_status(c, Duration::from_secs(30), |s| {
        s.sequences.iter().filter(|q| q.state == paused).count() == 8
    })
    .await;
    mute
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_streams_that_never_read_do_not_starve_a_small_request() {
    // a pause timeout far beyond the test: only the slot accounting can let the small request in
    let server = start_server(&[
        ("engine.max_running", "8"),
        ("engine.stream_buffer", "2"),
        ("engine.pause_timeout", "10m"),
    ])
    .await;
    let mut c = server.client().await;
    let mute = eight_mute_streams(&server, &mut c).await;
    let small = tokio::time::timeout(Duration::from_secs(20), collect(&mut c, text_request("Hello", 5)))
        .await
        .expect("a small request is not starved by streams that do not read");
    assert_eq!(small.ids.len(), 5, "{:?}", small.error);
    // (the small one leaves the batch in the step that sent its completion; the status follows that step)
    let s = wait_status(&mut c, Duration::from_secs(5), |s| s.running == 8).await;
    assert!(
        s.kv_true_bytes > 0,
        "the paused ones are still there, holding their caches"
    );
    drop(mute);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streams_that_never_read_end_after_the_pause_timeout_and_free_their_caches() {
    let server = start_server(&[("engine.stream_buffer", "2"), ("engine.pause_timeout", "2s")]).await;
    let mut c = server.client().await;
    let mute = eight_mute_streams(&server, &mut c).await;
    wait_status(&mut c, Duration::from_secs(15), |s| {
        s.running == 0 && s.kv_true_bytes == 0
    })
    .await;
    assert!(status(&mut c).await.sequences.is_empty());
    drop(mute);
    server.stop().await;
}
