//! Bad requests get the documented status code and a message naming the field; the daemon keeps serving.

mod common;

use common::daemon::{chat_request, collect, start_server, status, text_request, wait_status, Client};
use pmkvq::server::proto as pb;
use std::time::Duration;
use tonic::Code;

fn sampling(f: impl FnOnce(&mut pb::SamplingParams)) -> pb::GenerateRequest {
    let mut r = text_request("Hello", 4);
    let mut s = pb::SamplingParams::default();
    f(&mut s);
    r.sampling = Some(s);
    r
}

fn stopping(f: impl FnOnce(&mut pb::StoppingCriteria)) -> pb::GenerateRequest {
    let mut r = text_request("Hello", 4);
    f(r.stopping.as_mut().unwrap());
    r
}

async fn expect_refused(c: &mut Client, name: &str, req: pb::GenerateRequest, code: Code, field: &str) {
    match c.generate(req).await {
        Ok(_) => panic!("{name}: accepted, expected {code:?}"),
        Err(st) => {
            assert_eq!(st.code(), code, "{name}: {}", st.message());
            assert!(
                st.message().contains(field),
                "{name}: the message must name `{field}`: {}",
                st.message()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_are_refused_with_the_field_and_the_bound() {
    let server = start_server(&[("engine.max_tokens_limit", "1000"), ("engine.max_stop", "4")]).await;
    let mut c = server.client().await;
    let long_prompt = "word ".repeat(9000);
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        ("empty prompt", text_request("", 4), "`text` must not be empty"),
        ("no input", pb::GenerateRequest::default(), "`input"),
        (
            "empty token list",
            {
                let mut r = text_request("x", 4);
                r.input = Some(pb::generate_request::Input::Tokens(pb::TokenIds { ids: vec![] }));
                r
            },
            "`tokens.ids` must not be empty",
        ),
        (
            "prompt over the context",
            text_request(&long_prompt, 4),
            "the model's context",
        ),
        (
            "temperature < 0",
            sampling(|s| s.temperature = Some(-0.5)),
            "`sampling.temperature`",
        ),
        (
            "top_p 0",
            sampling(|s| s.top_p = Some(0.0)),
            "`sampling.top_p` must be in (0, 1]",
        ),
        ("top_p > 1", sampling(|s| s.top_p = Some(1.5)), "`sampling.top_p`"),
        ("min_p 1", sampling(|s| s.min_p = Some(1.0)), "`sampling.min_p`"),
        (
            "max_tokens 0",
            stopping(|s| s.max_tokens = Some(0)),
            "`stopping.max_tokens` must be >= 1",
        ),
        (
            "max_tokens over the limit",
            stopping(|s| s.max_tokens = Some(1001)),
            "`stopping.max_tokens` must be <= 1000",
        ),
        (
            "unknown token id",
            {
                let mut r = text_request("x", 4);
                r.input = Some(pb::generate_request::Input::Tokens(pb::TokenIds {
                    ids: vec![1, 2, 4_000_000],
                }));
                r
            },
            "`tokens.ids[2]` must be < 49152",
        ),
        (
            "too many stop strings",
            stopping(|s| s.stop = vec!["a".into(); 5]),
            "`stopping.stop` may hold at most 4",
        ),
        (
            "empty stop string",
            stopping(|s| s.stop = vec![String::new()]),
            "`stopping.stop[0]`",
        ),
        (
            "unknown stop token",
            stopping(|s| s.stop_token_ids = vec![49152]),
            "`stopping.stop_token_ids[0]`",
        ),
        (
            "zero time limit",
            stopping(|s| s.time_limit_ms = Some(0)),
            "`stopping.time_limit_ms`",
        ),
        (
            "malformed chat role",
            chat_request(&[("user", "hi"), ("wizard", "abracadabra")], 4),
            "messages[1].role",
        ),
        ("empty chat", chat_request(&[], 4), "`chat.messages` must not be empty"),
        (
            "unknown kv method",
            {
                let mut r = text_request("x", 4);
                r.kv = Some(pb::KvPolicy {
                    method: Some("fp12".into()),
                    ..Default::default()
                });
                r
            },
            "`kv.method`",
        ),
        (
            "bad min bits",
            {
                let mut r = text_request("x", 4);
                r.kv = Some(pb::KvPolicy {
                    min_bits: Some(3),
                    ..Default::default()
                });
                r
            },
            "`kv.min_bits` must be 2, 4, 8 or 16",
        ),
        (
            "priority out of range",
            {
                let mut r = text_request("x", 4);
                r.kv = Some(pb::KvPolicy {
                    priority: Some(1000),
                    ..Default::default()
                });
                r
            },
            "`kv.priority`",
        ),
        (
            "request id too long",
            {
                let mut r = text_request("x", 4);
                r.request_id = "x".repeat(200);
                r
            },
            "`request_id` must be <= 128 bytes",
        ),
    ];
    for (name, req, field) in cases {
        expect_refused(&mut c, name, req, Code::InvalidArgument, field).await;
    }
    // Tokenize validates too.
    let st = c
        .tokenize(pb::TokenizeRequest { input: None })
        .await
        .expect_err("no input");
    assert_eq!(st.code(), Code::InvalidArgument);
    // Still serving, nothing left behind.
    let ok = collect(&mut c, text_request("The capital of France is", 8)).await;
    assert_eq!(ok.ids.len(), 8);
    let s = status(&mut c).await;
    assert!(s.ready && s.sequences.is_empty() && s.kv_true_bytes == 0, "{s:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_with_resource_exhausted() {
    let server = start_server(&[("engine.max_running", "1"), ("engine.max_queued", "2")]).await;
    let mut c = server.client().await;
    let endless = || {
        let mut r = text_request("Once upon a time", 4000);
        r.stopping.as_mut().unwrap().ignore_eos = Some(true);
        r
    };
    let running = c.generate(endless()).await.unwrap().into_inner();
    wait_status(&mut c, Duration::from_secs(10), |s| s.running == 1).await;
    let q1 = c.generate(endless()).await.unwrap().into_inner();
    let q2 = c.generate(endless()).await.unwrap().into_inner();
    wait_status(&mut c, Duration::from_secs(10), |s| s.queued == 2).await;
    let st = c.generate(endless()).await.expect_err("the queue is full");
    assert_eq!(st.code(), Code::ResourceExhausted, "{}", st.message());
    assert!(st.message().contains("limit 2"), "{}", st.message());
    // Dropping the queued ones frees their slots.
    drop(q1);
    drop(q2);
    wait_status(&mut c, Duration::from_secs(10), |s| s.queued == 0).await;
    let accepted = c.generate(endless()).await;
    assert!(accepted.is_ok(), "a slot is free again");
    drop(accepted);
    drop(running);
    wait_status(&mut c, Duration::from_secs(10), |s| s.sequences.is_empty()).await;
    server.stop().await;
}
