//! The OpenAI-compatible HTTP API, end to end on the real model: the official `openai` Python package (installed
//! by the test command beside grpcio) against gRPC Generate for the same greedy requests; raw HTTP/1.1 for what a
//! client library hides (status codes, error objects, SSE framing, disconnects, auth, draining).

mod common;

use common::daemon::{chat_request, collect, spawn_http, start_server_http, text_request, wait_status};
use common::http::{get, post, request};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::io::AsyncBufReadExt;

const TOKEN: &str = "http-test-admin-token-0123";

fn python() -> String {
    std::env::var("PMKVQ_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn script() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/python/openai_check.py")
}

/// pmkvqd on the default model with the HTTP API on a free port and `overrides`: the server and its HTTP address.
async fn with_http(overrides: &[(&str, &str)]) -> (common::daemon::TestServer, String) {
    start_server_http(overrides, |_| {}).await
}

/// An error object in OpenAI's shape naming `param`.
fn assert_error(v: &Value, status: u16, param: Option<&str>) {
    let e = &v["error"];
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    assert!(e["type"].is_string(), "{v}");
    let want_type = match status {
        401 => "authentication_error",
        403 => "permission_error",
        429 => "rate_limit_error",
        s if s >= 500 => "server_error",
        _ => "invalid_request_error",
    };
    assert_eq!(e["type"], want_type, "{v}");
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{v}");
        assert!(
            e["message"].as_str().unwrap().contains(p),
            "the message names `{p}`: {v}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_package_gets_the_same_tokens_as_grpc() {
    let (server, http) = with_http(&[]).await;
    let mut c = server.client().await;
    let (chat_prompt, text_prompt, max_tokens) = ("Name three colours of the rainbow.", "The capital of France is", 24);
    let chat = collect(&mut c, chat_request(&[("user", chat_prompt)], max_tokens)).await;
    let text = collect(&mut c, text_request(text_prompt, max_tokens)).await;
    let base = format!("http://{http}/v1");
    let out = tokio::process::Command::new(python())
        .args([
            script(),
            "check",
            &base,
            chat_prompt,
            text_prompt,
            &max_tokens.to_string(),
        ])
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    assert!(
        out.status.success(),
        "the openai client failed (scripts/test.sh installs `openai` into PMKVQ_PYTHON's venv):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["models"], json!(["SmolLM2-135M-Instruct.Q4_1.gguf"]));
    let finish = |r: &common::daemon::Collected| match r.finish_reason() {
        pmkvq::server::proto::FinishReason::Eos | pmkvq::server::proto::FinishReason::Stop => "stop",
        _ => "length",
    };
    for (name, want) in [
        ("chat", &chat),
        ("chat_stream", &chat),
        ("completion", &text),
        ("completion_stream", &text),
    ] {
        let got = &j[name];
        assert_eq!(got["text"], want.text, "{name}: the same text as gRPC Generate");
        assert_eq!(got["finish_reason"], finish(want), "{name}");
        if !got["usage"].is_null() {
            assert_eq!(got["usage"]["completion_tokens"], want.ids.len(), "{name}");
            let prompt = want.complete.as_ref().unwrap().usage.as_ref().unwrap().prompt_tokens;
            assert_eq!(got["usage"]["prompt_tokens"], prompt, "{name}");
            assert_eq!(got["usage"]["total_tokens"], prompt as usize + want.ids.len(), "{name}");
        }
    }
    assert!(
        !j["chat_stream"]["usage"].is_null(),
        "include_usage sends a usage chunk"
    );
    assert_eq!(
        j["chat_stream"]["roles"],
        json!(["assistant"]),
        "the first chunk alone carries the role"
    );
    assert!(
        j["chat_stream"]["chunks"].as_u64().unwrap() >= 3,
        "streamed in pieces: {}",
        j["chat_stream"]
    );
    assert_eq!(j["chat"]["object"], "chat.completion");
    assert_eq!(j["completion"]["object"], "text_completion");
    let errors = &j["errors"];
    for (name, status, param) in [
        ("temperature", 400, Some("temperature")),
        ("n", 400, Some("n")),
        ("max_tokens", 400, Some("max_tokens")),
        ("empty_messages", 400, Some("messages")),
        ("unknown_field", 400, Some("max_token")),
        ("model", 404, Some("model")),
    ] {
        let e = &errors[name];
        assert_eq!(e["status"], status, "{name}: {e}");
        // (the client hands over the body's `error` object)
        assert_error(&json!({"error": e["body"]}), status, param);
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_stream_frees_the_sequence_within_a_second() {
    let (server, http) = with_http(&[]).await;
    let mut c = server.client().await;
    let mut child = tokio::process::Command::new(python())
        .args([script(), "disconnect", &format!("http://{http}/v1")])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python()));
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
        .await
        .expect("the client reads three chunks")
        .unwrap();
    assert_eq!(line.as_deref(), Some("closed"), "client output: {line:?}");
    let closed = Instant::now();
    let s = wait_status(&mut c, Duration::from_secs(1), |s| s.running == 0 && s.queued == 0).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the client is still alive: the stream's close did it"
    );
    assert_eq!(s.kv_true_bytes, 0);
    eprintln!("freed {:?} after the client closed the stream", closed.elapsed());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_with_the_right_status() {
    let (server, http) = with_http(&[("auth.token", TOKEN)]).await;
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (path, body, status, param) in [
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "top_p": 2.0}),
            400,
            Some("top_p"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "stop": vec!["a"; 17]}),
            400,
            Some("stop"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "kv_min_bits": 3}),
            400,
            Some("kv_min_bits"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "kv_method": "zip"}),
            400,
            Some("kv_method"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "max_completion_tokens": 0}),
            400,
            Some("max_completion_tokens"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": 7}]}),
            400,
            Some("messages[0].content"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": msgs, "priority": 5}),
            403,
            Some("priority"),
        ),
        ("/v1/completions", json!({"prompt": ""}), 400, Some("prompt")),
        (
            "/v1/completions",
            json!({"prompt": [1, 2, 999999]}),
            400,
            Some("prompt[2]"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "echo": true}),
            400,
            Some("echo"),
        ),
        (
            "/v1/completions",
            json!({"prompt": "x", "model": "gpt-4"}),
            404,
            Some("model"),
        ),
        ("/v1/admin/memory_budget", json!({"bytes": 1000000}), 401, None),
    ] {
        let r = post(&http, path, &body).await;
        assert_eq!(r.status, status, "{path} {body}: {}", r.body);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_error(&r.json(), status, param);
    }
    // Not JSON, the wrong method, no such route, too large: still OpenAI's shape.
    let r = request(&http, "POST", "/v1/completions", &[], Some("{\"prompt\": ")).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not valid JSON"));
    let r = get(&http, "/v1/chat/completions").await;
    assert_eq!(r.status, 405, "{}", r.body);
    assert_error(&r.json(), 405, None);
    let r = get(&http, "/v1/nothing").await;
    assert_eq!(r.status, 404);
    assert_error(&r.json(), 404, None);
    // Too large: declared (answered before the body is read) and chunked (cut at the limit).
    let declared = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{{",
        pmkvq::server::http::MAX_BODY_BYTES + 1
    );
    let r = common::http::send_raw(&http, declared.as_bytes()).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_error(&r.json(), 413, None);
    let piece = "a".repeat(1 << 20);
    let mut chunked = String::from(
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    for _ in 0..=pmkvq::server::http::MAX_BODY_BYTES >> 20 {
        chunked.push_str(&format!("{:x}\r\n{piece}\r\n", piece.len()));
    }
    chunked.push_str("0\r\n\r\n");
    let r = common::http::send_raw(&http, chunked.as_bytes()).await;
    assert_eq!(r.status, 413, "{}", r.body);
    assert_error(&r.json(), 413, None);
    // The admin token raises priority and sets the budget, as on gRPC.
    let bearer = format!("Bearer {TOKEN}");
    let auth = [("Authorization", bearer.as_str())];
    let body = json!({"prompt": "Hello", "max_tokens": 2, "priority": 5}).to_string();
    let r = request(&http, "POST", "/v1/completions", &auth, Some(&body)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request(
        &http,
        "POST",
        "/v1/admin/memory_budget",
        &auth,
        Some("{\"fraction\": 2}"),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_error(&r.json(), 400, Some("fraction"));
    let r = request(
        &http,
        "POST",
        "/v1/admin/memory_budget",
        &auth,
        Some("{\"bytes\": 20000000}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["budget_bytes"], 20_000_000);
    assert_eq!(r.json()["source"], "operator");
    let mut c = server.client().await;
    // (the engine takes the new budget at its next loop)
    wait_status(&mut c, Duration::from_secs(5), |s| s.kv_budget_bytes == 20_000_000).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_health_metrics_and_request_ids() {
    let (server, http) = with_http(&[("http.model_name", "smollm2"), ("http.metrics", "true")]).await;
    let r = get(&http, "/v1/models").await;
    assert_eq!(r.status, 200);
    let m = r.json();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "smollm2");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(get(&http, "/v1/models/smollm2").await.status, 200);
    assert_eq!(get(&http, "/v1/models/other").await.status, 404);
    let h = get(&http, "/health").await;
    assert_eq!((h.status, h.json()["status"].clone()), (200, json!("ok")));
    let r = request(
        &http,
        "POST",
        "/v1/completions",
        &[("X-Request-Id", "my-id-7")],
        Some(&json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 3}).to_string()),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-request-id"), Some("my-id-7"));
    assert_eq!(r.json()["id"], "cmpl-my-id-7");
    assert!(r.json()["pmkvq"]["kv"]["tokens"].as_u64().unwrap() > 0);
    let metrics = get(&http, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("pmkvq_generated_tokens_total"),
        "{}",
        metrics.body
    );
    server.stop().await;
}

/// While the daemon drains, `/health` says 503 and new requests are refused with 503, and a stream in flight ends
/// properly (its last chunk, then `[DONE]`) when the grace period cuts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_answers_503_and_ends_open_streams_cleanly() {
    let (server, http) = with_http(&[("shutdown.grace", "2s")]).await;
    let mut c = server.client().await;
    let h2 = http.clone();
    let stream = tokio::spawn(async move {
        let body = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true});
        post(&h2, "/v1/completions", &body).await
    });
    wait_status(&mut c, Duration::from_secs(30), |s| s.running == 1).await;
    let stopping = tokio::spawn(server.stop());
    let t0 = Instant::now();
    let mut saw_503 = false;
    while t0.elapsed() < Duration::from_secs(2) {
        let h = get(&http, "/health").await;
        if h.status == 503 {
            assert_eq!(h.json()["error"]["code"], "draining", "{}", h.body);
            let r = post(&http, "/v1/completions", &json!({"prompt": "x"})).await;
            assert_eq!(r.status, 503, "{}", r.body);
            assert_eq!(r.header("retry-after"), Some("1"));
            saw_503 = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saw_503, "/health turned 503 while draining");
    let r = stream.await.unwrap();
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["pmkvq"]["finish_reason"], "cancelled");
    stopping.await.unwrap();
}

/// A fault inside the engine ends that request: a stream gets an error event and `[DONE]`, a plain request a 500,
/// both in OpenAI's shape; the next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_fault_ends_the_request_with_an_openai_error() {
    use pmkvq::engine::{FaultHook, FaultPoint};
    let (server, http) = start_server_http(&[], |c| {
        c.fault = Some(FaultHook(std::sync::Arc::new(|p, r| {
            p == FaultPoint::Step && r.starts_with("boom")
        })))
    })
    .await;
    let body = json!({"prompt": "Hi", "max_tokens": 8, "stream": true}).to_string();
    let r = request(
        &http,
        "POST",
        "/v1/completions",
        &[("X-Request-Id", "boom-1")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200);
    let data = r.sse_data();
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{}", r.body);
    let err: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_error(&err, 500, None);
    let body = json!({"prompt": "Hi", "max_tokens": 8}).to_string();
    let r = request(
        &http,
        "POST",
        "/v1/completions",
        &[("X-Request-Id", "boom-2")],
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 500, "{}", r.body);
    assert_error(&r.json(), 500, None);
    let r = post(&http, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 4})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 4);
    server.stop().await;
}

/// With the queue full a request gets 429 (with Retry-After) in OpenAI's shape; the held ones are unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429() {
    let (server, http) = with_http(&[("engine.max_running", "1"), ("engine.max_queued", "1")]).await;
    let mut c = server.client().await;
    let long = json!({"prompt": "Once upon a time", "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let (h1, b1) = (http.clone(), long.clone());
    let running = tokio::spawn(async move { post(&h1, "/v1/completions", &b1).await });
    wait_status(&mut c, Duration::from_secs(30), |s| s.running == 1).await;
    let (h2, b2) = (http.clone(), long.clone());
    let queued = tokio::spawn(async move { post(&h2, "/v1/completions", &b2).await });
    wait_status(&mut c, Duration::from_secs(30), |s| s.queued == 1).await;
    let r = post(&http, "/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["code"], "queue_full");
    assert_error(&r.json(), 429, None);
    // Hanging up frees both (the queued one never started).
    running.abort();
    queued.abort();
    wait_status(&mut c, Duration::from_secs(5), |s| s.running == 0 && s.queued == 0).await;
    server.stop().await;
}

/// `tls.cert`/`tls.key` serve the HTTP API over TLS too; the official client verifies the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_the_grpc_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let model = common::default_model_path();
    let (server, http) = spawn_http(|http| {
        pmkvq::config::from_pairs(&[
            ("model", model.to_str().unwrap()),
            ("http.listen", http),
            ("tls.cert", cert_path.to_str().unwrap()),
            ("tls.key", key_path.to_str().unwrap()),
        ])
        .unwrap()
    })
    .await;
    let port = http.rsplit(':').next().unwrap();
    let out = tokio::process::Command::new(python())
        .args([
            script(),
            "tls",
            &format!("https://localhost:{port}/v1"),
            cert_path.to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["completion_tokens"], 5, "{j}");
    // Plain HTTP to the TLS port gets no answer in clear text.
    let plain = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = tokio::net::TcpStream::connect(&http).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf).await;
        buf
    })
    .await
    .unwrap();
    assert!(
        !String::from_utf8_lossy(&plain).contains("\"ok\""),
        "no clear-text answer"
    );
    server.stop().await;
}

/// `/health` answers 503 (`loading`) from the moment the listener is up until the model is warm, then 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_until_the_model_is_warm() {
    use pmkvq::engine::{FaultHook, FaultPoint};
    // The listener is up before the model loads: `spawn_http` returns then, without waiting for the warm-up.
    let (mut server, http) = spawn_http(|http| {
        let model = common::default_model_path();
        let mut cfg = pmkvq::config::from_pairs(&[("model", model.to_str().unwrap()), ("http.listen", http)]).unwrap();
        cfg.fault = Some(FaultHook(std::sync::Arc::new(|p, _| {
            if p == FaultPoint::WarmUp {
                std::thread::sleep(Duration::from_secs(2));
            }
            false
        })));
        cfg
    })
    .await;
    let t0 = Instant::now();
    let mut seen = Vec::new();
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(mut s) = tokio::net::TcpStream::connect(&http).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut buf = String::new();
            s.read_to_string(&mut buf).await.unwrap();
            let status = if buf.starts_with("HTTP/1.1 200") { 200 } else { 503 };
            if status == 503 {
                assert!(buf.contains("\"loading\""), "{buf}");
                assert!(buf.contains("\"server_error\""), "{buf}");
            }
            if seen.last() != Some(&status) {
                seen.push(status);
            }
            if status == 200 {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, [503, 200], "503 while loading and warming up, then 200");
    server.ready().await;
    server.stop().await;
}

/// An `http.listen` address already in use ends the start with an error naming the address (and the harness's
/// retry on a lost port recognises exactly that error).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_address_in_use_ends_the_start_naming_it() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http = held.local_addr().unwrap().to_string();
    let model = common::default_model_path();
    let cfg = pmkvq::config::from_pairs(&[("model", model.to_str().unwrap()), ("http.listen", &http)]).unwrap();
    let e = match common::daemon::launch(cfg).await {
        Ok(_) => panic!("started on {http}, which is held"),
        Err(e) => e,
    };
    assert!(common::daemon::lost_port(&e, &http), "{e:?}");
    assert!(e.to_string().contains(&http), "{e}");
}
