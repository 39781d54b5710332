//! Thinking spans end to end through pmkvqd (gRPC and the OpenAI-compatible HTTP API), on a tiny random-weight
//! Qwen3 whose vocabulary has `<think>`/`</think>`, with real chat templates (Qwen3's and a DeepSeek-R1
//! distill's, fetched by `scripts/fetch-chat-templates.sh`): chunks say which tokens are reasoning, usage counts
//! them, the thinking budget closes the span by emitting the end-of-thinking tokens, and `enable_thinking`
//! reaches the template. (Random weights make the text meaningless; the mechanics are what is checked.)

mod common;

use common::daemon::{chat_request, collect, start_server, start_server_http, text_request, Collected};
use common::http::post;
use common::tiny::{write_thinking_gguf, TinyArch, TinySpec, QWEN3_TEMPLATE, R1_TEMPLATE};
use serde_json::json;

const NEWLINE: u32 = 61;
const OPEN: u32 = 62;
const CLOSE: u32 = 63;

fn spec() -> TinySpec {
    let mut s = TinySpec::new(TinyArch::Qwen3);
    s.seed = 21;
    s
}

/// (token, reasoning) for every generated token, from the chunks.
fn flagged(raw: &[pmkvq::server::proto::GenerateResponse]) -> Vec<(u32, bool)> {
    raw.iter()
        .filter_map(|m| match &m.kind {
            Some(pmkvq::server::proto::generate_response::Kind::Chunk(ch)) => {
                Some(ch.token_ids.iter().map(|&t| (t, ch.reasoning)).collect::<Vec<_>>())
            }
            _ => None,
        })
        .flatten()
        .collect()
}

async fn run(
    c: &mut common::daemon::Client,
    req: pmkvq::server::proto::GenerateRequest,
) -> (Collected, Vec<(u32, bool)>) {
    let mut stream = c.generate(req).await.expect("accepted").into_inner();
    let mut raw = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        raw.push(m);
    }
    let mut out = Collected::default();
    for m in &raw {
        match &m.kind {
            // `text`: the answer; reasoning is collected apart (as a client that hides or dims it would)
            Some(pmkvq::server::proto::generate_response::Kind::Chunk(ch)) => {
                out.ids.extend_from_slice(&ch.token_ids);
                if !ch.reasoning {
                    out.text.push_str(&ch.text);
                }
            }
            Some(pmkvq::server::proto::generate_response::Kind::Complete(cm)) => out.complete = Some(cm.clone()),
            Some(pmkvq::server::proto::generate_response::Kind::Error(e)) => out.error = Some(e.message.clone()),
            None => {}
        }
    }
    let f = flagged(&raw);
    (out, f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_thinking_budget_closes_an_open_span_and_the_answer_follows() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_thinking_gguf(
        &spec(),
        &dir.path().join("r1.gguf"),
        &common::chat_template(R1_TEMPLATE),
    );
    let (server, http) = start_server_http(&[("model", model.to_str().unwrap()), ("profile", "none")], |_| {}).await;
    let mut c = server.client().await;
    let budget = 5;
    let mut req = chat_request(&[("user", "abc")], 24);
    req.stopping.as_mut().unwrap().ignore_eos = Some(true);
    // This template opens the span and closes it again unless thinking is asked for: closed, nothing reasons.
    let (closed_run, closed) = run(&mut c, req.clone()).await;
    let first_open = closed.iter().position(|&(t, _)| t == OPEN).unwrap_or(closed.len());
    assert!(closed[..first_open].iter().all(|&(_, r)| !r), "{closed:?}");
    req.enable_thinking = Some(true);
    req.thinking_budget = Some(budget);
    let (got, tokens) = run(&mut c, req.clone()).await;
    let done = got.complete.clone().expect("completes");
    let prompt = |x: &Collected| x.complete.as_ref().unwrap().usage.unwrap().prompt_tokens;
    // `<｜User｜>abc<｜Assistant｜><think>\n` + `</think>`: the markers are single tokens, the switch adds one.
    assert_eq!((prompt(&got), prompt(&closed_run)), (7, 8));
    // The prompt opened the span: reasoning from the first token; after `budget` reasoning tokens the engine emits
    // `</think>` and the blank line, then the answer follows.
    let close = tokens
        .iter()
        .position(|&(t, _)| t == CLOSE)
        .expect("the span is closed within 24 tokens");
    assert!(tokens[..=close].iter().all(|&(_, r)| r), "{tokens:?}");
    let usage = done.usage.unwrap();
    let reasoning = tokens.iter().filter(|&&(_, r)| r).count();
    assert_eq!(usage.reasoning_tokens as usize, reasoning, "{tokens:?}");
    assert!(
        done.thinking_budget_reached,
        "the seed is chosen so the budget, not the model, closes the span"
    );
    assert_eq!(close, budget as usize, "closed right after the budget: {tokens:?}");
    assert_eq!(
        &tokens[close + 1..close + 3],
        &[(NEWLINE, false), (NEWLINE, false)],
        "{tokens:?}"
    );
    // After the span nothing is reasoning (unless the model opens another one).
    let reopen = tokens[close..]
        .iter()
        .position(|&(t, _)| t == OPEN)
        .map_or(tokens.len(), |i| close + i);
    assert!(tokens[close + 1..reopen].iter().all(|&(_, r)| !r), "{tokens:?}");
    assert!(
        got.text.chars().all(|ch| ch != '<'),
        "markers carry no text: {:?}",
        got.text
    );

    // Without a budget the same prompt reasons longer (the model does not close the span by itself here).
    let mut free = req.clone();
    free.thinking_budget = None;
    let (_, free_tokens) = run(&mut c, free).await;
    assert!(free_tokens.iter().take(budget as usize + 1).all(|&(_, r)| r));

    // The same over HTTP: reasoning arrives as `reasoning_content`, usage counts it.
    let body = json!({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 24, "ignore_eos": true,
                      "thinking_budget": budget, "enable_thinking": true, "stream": true, "stream_options": {"include_usage": true}});
    let r = post(&http, "/v1/chat/completions", &body).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let events: Vec<serde_json::Value> = r
        .sse_data()
        .iter()
        .filter(|d| d.as_str() != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let reasoning_text: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["reasoning_content"].as_str())
        .collect();
    let answer: String = events
        .iter()
        .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
        .collect();
    let usage = &events.last().unwrap()["usage"];
    assert_eq!(
        usage["completion_tokens_details"]["reasoning_tokens"], reasoning,
        "{usage}"
    );
    assert!(
        !reasoning_text.is_empty() && answer == got.text,
        "{reasoning_text:?} / {answer:?}"
    );
    let non_stream = post(
        &http,
        "/v1/chat/completions",
        &json!({"messages": [{"role": "user", "content": "abc"}], "max_tokens": 24, "ignore_eos": true,
                "thinking_budget": budget, "chat_template_kwargs": {"enable_thinking": true}}),
    )
    .await
    .json();
    assert_eq!(non_stream["choices"][0]["message"]["reasoning_content"], reasoning_text);
    assert_eq!(non_stream["choices"][0]["message"]["content"], answer);
    assert_eq!(non_stream["pmkvq"]["finish_reason"], "length");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_thinking_reaches_the_template_and_a_closed_span_is_not_reasoning() {
    let dir = tempfile::tempdir().unwrap();
    let model = write_thinking_gguf(
        &spec(),
        &dir.path().join("qwen3.gguf"),
        &common::chat_template(QWEN3_TEMPLATE),
    );
    let server = start_server(&[("model", model.to_str().unwrap()), ("profile", "none")]).await;
    let mut c = server.client().await;
    let mut on = chat_request(&[("user", "abc")], 12);
    on.stopping.as_mut().unwrap().ignore_eos = Some(true);
    let mut off = on.clone();
    off.enable_thinking = Some(false);
    let (a, _) = run(&mut c, on).await;
    let (b, b_tokens) = run(&mut c, off).await;
    let prompt = |x: &Collected| x.complete.as_ref().unwrap().usage.unwrap().prompt_tokens;
    // `<think>\n\n</think>\n\n`: six tokens more in the prompt, a closed span, so nothing generated is reasoning
    // until the model opens a span itself.
    assert_eq!(prompt(&b), prompt(&a) + 6);
    let first_open = b_tokens.iter().position(|&(t, _)| t == OPEN).unwrap_or(b_tokens.len());
    assert!(b_tokens[..first_open].iter().all(|&(_, r)| !r), "{b_tokens:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thinking_budget_on_a_model_without_a_span_is_refused_naming_the_field() {
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    let mut req = text_request("Hello", 4);
    req.thinking_budget = Some(8);
    let e = c.generate(req).await.expect_err("refused");
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    assert!(e.message().contains("`thinking_budget`"), "{}", e.message());
    // and everything else about the request is as before
    let ok = collect(&mut c, text_request("Hello", 4)).await;
    assert_eq!(ok.complete.unwrap().usage.unwrap().reasoning_tokens, 0);
    server.stop().await;
}

/// Generate on the R1-style tiny model, cut the KV budget to `room` more tokens than the prompt a few tokens in
/// (each step slowed to 20 ms by a fault hook that injects nothing, so the cut lands mid-thought), then read to
/// the end: (tokens with flags, completion).
async fn cut_mid_thought(overrides: &[(&str, &str)], room: u64) -> (Vec<(u32, bool)>, pmkvq::server::proto::Complete) {
    use pmkvq::server::proto::{self as pb, pmkvq_admin_client::PmkvqAdminClient};
    let dir = tempfile::tempdir().unwrap();
    let model = write_thinking_gguf(
        &spec(),
        &dir.path().join("r1.gguf"),
        &common::chat_template(R1_TEMPLATE),
    );
    let mut pairs = vec![("model", model.to_str().unwrap()), ("profile", "none")];
    pairs.extend_from_slice(overrides);
    let server = common::daemon::start_server_with(&pairs, |c| {
        c.fault = Some(pmkvq::engine::FaultHook(std::sync::Arc::new(|p, _| {
            if p == pmkvq::engine::FaultPoint::Step {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            false
        })))
    })
    .await;
    let mut c = server.client().await;
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    let per_token = info.kv_bytes_per_token.iter().find(|k| k.bits == 16).unwrap().bytes;
    let mut req = chat_request(&[("user", "abc")], 200);
    req.stopping.as_mut().unwrap().ignore_eos = Some(true);
    req.enable_thinking = Some(true);
    req.kv = Some(pb::KvPolicy {
        method: Some("fp16".into()),
        ..Default::default()
    });
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let status = common::daemon::wait_status(&mut c, std::time::Duration::from_secs(10), |s| {
        s.sequences.iter().any(|q| q.generated_tokens >= 3)
    })
    .await;
    let seq = &status.sequences[0];
    let budget = (seq.prompt_tokens as u64 + room) * per_token;
    let mut admin = PmkvqAdminClient::connect(server.url()).await.unwrap();
    admin
        .set_memory_budget(pb::SetMemoryBudgetRequest {
            budget: Some(pb::set_memory_budget_request::Budget::Bytes(budget)),
        })
        .await
        .unwrap();
    let mut raw = vec![first];
    while let Some(m) = stream.message().await.unwrap() {
        raw.push(m);
    }
    let complete = raw
        .iter()
        .find_map(|m| match &m.kind {
            Some(pb::generate_response::Kind::Complete(c)) => Some(c.clone()),
            _ => None,
        })
        .expect("completes");
    server.stop().await;
    (flagged(&raw), complete)
}

/// `on_memory_pressure = "conclude"`: a reasoning trace whose budget is cut below what its thinking would need
/// closes its span while `conclude_reserve` tokens still fit, and answers until the floor is full; with `end` the
/// same trace ends mid-thought.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_reasoning_trace_concludes_instead_of_ending_mid_thought() {
    use pmkvq::server::proto::FinishReason;
    let (ended, e) = cut_mid_thought(&[], 60).await;
    assert_eq!(e.finish_reason, FinishReason::MemoryPressure as i32);
    assert!(!e.thinking_concluded);
    assert!(
        ended.iter().all(|&(t, r)| r && t != CLOSE),
        "still thinking when it ended: {ended:?}"
    );

    let reserve = 16;
    let (concluded, c) = cut_mid_thought(
        &[
            ("engine.on_memory_pressure", "conclude"),
            ("engine.conclude_reserve", "16"),
        ],
        60,
    )
    .await;
    assert_eq!(
        c.finish_reason,
        FinishReason::MemoryPressure as i32,
        "it still ends at its floor"
    );
    assert!(c.thinking_concluded, "{concluded:?}");
    let close = concluded
        .iter()
        .position(|&(t, _)| t == CLOSE)
        .expect("the span was closed");
    let after = concluded.len() - close - 1;
    // `</think>` once `reserve` tokens no longer fit: the rest of the room (the reserve, less the step in flight
    // when the floor filled) comes after it.
    assert!(
        after + 1 >= reserve - 1,
        "{after} tokens after the close: {concluded:?}"
    );
    // The room after the close is the answer's: a span the (random) model opens again is closed at the next step,
    // so every reasoning token after the first close is a marker.
    for (i, &(t, r)) in concluded.iter().enumerate().skip(close + 1) {
        if r {
            assert!(
                t == OPEN || t == CLOSE,
                "token {i} reasons after the close: {concluded:?}"
            );
        }
        if t == OPEN && i + 1 < concluded.len() {
            assert_eq!(
                concluded[i + 1].0,
                CLOSE,
                "reopened at {i} and not closed: {concluded:?}"
            );
        }
    }
    let answer = concluded[close + 1..].iter().filter(|&&(_, r)| !r).count();
    eprintln!("concluded at token {close}; {answer} answer tokens of {after} after it");
    assert_eq!(concluded.len(), ended.len(), "both ran until the same floor");
    let flagged = concluded.iter().filter(|&&(_, r)| r).count();
    assert_eq!(c.usage.unwrap().reasoning_tokens as usize, flagged);
}
