//! Requests an attacker would send: priorities that overflow or buy precedence unasked, request ids that forge
//! log lines; and the operator warned when the admin token would cross the network in clear text.

mod common;

use common::daemon::{collect_stream, start_server, text_request};
use pmkvq::server::proto as pb;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

const TOKEN: &str = "0123456789abcdef0123";

fn with_priority(p: i32) -> pb::GenerateRequest {
    let mut r = text_request("Hello", 2);
    r.kv = Some(pb::KvPolicy {
        priority: Some(p),
        ..Default::default()
    });
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_cannot_overflow_or_be_raised_without_the_admin_token() {
    let server = start_server(&[("auth.token", TOKEN)]).await;
    let mut c = server.client().await;
    // i32::MIN used to pass: its abs() wraps to a negative in a release build.
    for p in [i32::MIN, i32::MIN + 1, -101, 101, i32::MAX] {
        let mut req = tonic::Request::new(with_priority(p));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
        let st = c.generate(req).await.expect_err("out of range");
        assert_eq!(st.code(), Code::InvalidArgument, "{p}: {}", st.message());
        assert!(
            st.message().contains("`kv.priority` must be in -100..=100"),
            "{}",
            st.message()
        );
    }
    // Above 0 without the token: refused, naming the field; with it: served.
    let st = c.generate(with_priority(50)).await.expect_err("needs the token");
    assert_eq!(st.code(), Code::PermissionDenied, "{}", st.message());
    assert!(st.message().contains("`kv.priority`"), "{}", st.message());
    let mut req = tonic::Request::new(with_priority(50));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let got = collect_stream(c.generate(req).await.expect("with the token").into_inner()).await;
    assert_eq!(got.ids.len(), 2);
    // 0 and below need nothing.
    for p in [0, -100] {
        let got = collect_stream(
            c.generate(with_priority(p))
                .await
                .expect("no token needed")
                .into_inner(),
        )
        .await;
        assert_eq!(got.ids.len(), 2, "{p}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_ids_must_be_printable_ascii() {
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    for id in [
        "abc\n2026-11-30T00:00:00Z INFO forged",
        "tab\there",
        "esc\u{1b}[2J",
        "caf\u{e9}",
        "nul\0",
    ] {
        let mut r = text_request("Hello", 2);
        r.request_id = id.to_string();
        let st = c.generate(r).await.expect_err("refused");
        assert_eq!(st.code(), Code::InvalidArgument, "{id:?}: {}", st.message());
        assert!(
            st.message().contains("`request_id` must be printable ASCII"),
            "{id:?}: {}",
            st.message()
        );
    }
    let mut r = text_request("Hello", 2);
    r.request_id = "client-42 / retry #3 ~ok".into();
    let got = collect_stream(c.generate(r).await.expect("printable").into_inner()).await;
    assert_eq!(got.ids.len(), 2);
    server.stop().await;
}

/// Starts pmkvqd with `args` and returns what it logged up to "listening" (or 20 s).
fn log_until_listening(args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pmkvqd"))
        .arg("--model")
        .arg(common::default_model_path())
        .args(args)
        .args(["--set", "log.filter=info"])
        .env_remove("PMKVQ_AUTH_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pmkvqd");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let t0 = Instant::now();
    let mut log = String::new();
    while t0.elapsed() < Duration::from_secs(20) {
        let Some(Ok(line)) = lines.next() else { break };
        log.push_str(&line);
        log.push('\n');
        if line.contains("listening") {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    log
}

#[test]
fn a_token_on_a_remote_listener_without_tls_is_warned_about() {
    let remote = log_until_listening(&["--listen", "0.0.0.0:0", "--set", &format!("auth.token={TOKEN}")]);
    assert!(remote.contains("listening"), "{remote}");
    assert!(remote.contains("the admin token travels in clear text"), "{remote}");
    let local = log_until_listening(&["--listen", "127.0.0.1:0", "--set", &format!("auth.token={TOKEN}")]);
    assert!(local.contains("listening"), "{local}");
    assert!(!local.contains("clear text"), "{local}");
}
