//! Generation over real loopback gRPC: parity with `pmkvq generate`, concurrent streams, KV states, the other
//! RPCs.

mod common;

use common::daemon::{chat_request, collect, start_server, status, text_request, Collected};
use pmkvq::server::proto as pb;
use std::process::Command;

/// `pmkvq generate --json` (the local CLI path) on a templated prompt: its token ids.
fn cli_ids(prompt_text: &str, max_tokens: usize, kv: &[&str]) -> Vec<u32> {
    let model = common::default_model_path();
    let out = Command::new(env!("CARGO_BIN_EXE_pmkvq"))
        .args([
            "generate",
            "--json",
            "--max-tokens",
            &max_tokens.to_string(),
            "--prompt",
            prompt_text,
        ])
        .arg("--model")
        .arg(&model)
        .args(kv)
        .output()
        .expect("run pmkvq generate");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    j["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

fn golden_request(case: &common::GoldenCase, max_tokens: u32) -> pb::GenerateRequest {
    let msgs: Vec<(&str, &str)> = case
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.as_str()))
        .collect();
    chat_request(&msgs, max_tokens)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tokens_match_pmkvq_generate_on_the_golden_prompts() {
    let golden = common::golden();
    // The daemon's defaults: PM-KVQ with the calibrated profile (found automatically), like
    // `pmkvq generate --kv pmkvq --profile profiles/default.profile.json`; and the f16 cache per request.
    let (_, tok) = common::load_default(1);
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    for case in &golden.cases {
        let n = case.greedy_ids.len() as u32;
        for (method, cli_kv) in [
            (
                None,
                vec!["--kv", "pmkvq", "--profile", "profiles/default.profile.json"],
            ),
            (Some("fp16"), vec!["--kv", "fp16"]),
        ] {
            let mut req = golden_request(case, n);
            req.kv = Some(pb::KvPolicy {
                method: method.map(str::to_string),
                ..Default::default()
            });
            let got = collect(&mut c, req).await;
            let usage = got.complete.as_ref().unwrap().usage.unwrap();
            assert_eq!(
                usage.prompt_tokens as usize,
                case.prompt_ids.len(),
                "{}: the chat template over gRPC must give the golden prompt",
                case.id
            );
            let want = cli_ids(&case.prompt_text, n as usize, &cli_kv);
            assert_eq!(
                got.ids, want,
                "{} ({method:?}): gRPC and `pmkvq generate` differ",
                case.id
            );
            assert_eq!(usage.completion_tokens as usize, got.ids.len());
            assert_eq!(
                got.text,
                tok.decode(&got.ids, false),
                "{}: streamed text must be the decoded tokens",
                case.id
            );
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_streams_match_each_alone() {
    let golden = common::golden();
    let server = start_server(&[("engine.max_running", "8")]).await;
    let mut c = server.client().await;
    let mut reqs: Vec<pb::GenerateRequest> = golden.cases.iter().map(|g| golden_request(g, 48)).collect();
    reqs.push(text_request("The three primary colours are", 48));
    reqs.push(chat_request(&[("user", "Name a prime number larger than 100.")], 48));
    assert_eq!(reqs.len(), 8);
    // Sampled streams too: a seed must reproduce its tokens whatever else is in the batch.
    reqs[7].sampling = Some(pb::SamplingParams {
        temperature: Some(0.8),
        top_p: Some(0.95),
        seed: Some(7),
        ..Default::default()
    });
    let mut alone = Vec::new();
    for r in &reqs {
        alone.push(collect(&mut c, r.clone()).await);
    }
    let steps_before = status(&mut c).await.steps;
    let handles: Vec<_> = reqs
        .iter()
        .cloned()
        .map(|r| {
            let url = server.url();
            tokio::spawn(async move {
                let mut c = pb::pmkvq_service_client::PmkvqServiceClient::connect(url)
                    .await
                    .unwrap();
                collect(&mut c, r).await
            })
        })
        .collect();
    let mut together: Vec<Collected> = Vec::new();
    for h in handles {
        together.push(h.await.unwrap());
    }
    let steps = status(&mut c).await.steps - steps_before;
    let tokens: usize = together.iter().map(|t| t.ids.len()).sum();
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert!(!a.ids.is_empty(), "request {i} produced nothing");
        assert_eq!(
            a.ids, b.ids,
            "request {i}: batched output differs from the same request alone"
        );
        assert_eq!(a.text, b.text, "request {i}");
        assert_ne!(a.request_id, b.request_id, "generated request ids are unique");
    }
    // Batched: far fewer forward passes than tokens (each step decodes every running stream).
    assert!(
        (steps as usize) < tokens / 2,
        "{steps} forward passes for {tokens} tokens: the streams were not batched"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_state_stop_strings_and_other_rpcs() {
    let server = start_server(&[]).await;
    let mut c = server.client().await;

    // KV state every 4 tokens, with one width per layer.
    let mut req = chat_request(&[("user", "Count from one to twenty in words.")], 24);
    req.kv_state_every = Some(4);
    req.request_id = "my-id-1".into();
    let got = collect(&mut c, req).await;
    assert_eq!(got.request_id, "my-id-1");
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (info.device.as_str(), info.device_weight_bytes),
        ("cpu", 0),
        "where the forward pass runs"
    );
    let at: Vec<usize> = got.kv_states.iter().map(|(n, _)| *n).collect();
    let want: Vec<usize> = (1..=got.ids.len() / 4).map(|k| 4 * k).collect();
    assert_eq!(at, want, "a KV state every 4 tokens");
    for (n, kv) in &got.kv_states {
        assert_eq!(kv.layer_bits.len(), info.layers as usize);
        assert!(kv.true_bytes > 0 && kv.tokens as usize >= *n);
    }
    let done = got.complete.as_ref().unwrap();
    assert_eq!(done.kv.as_ref().unwrap().layer_bits.len(), info.layers as usize);
    let t = done.timings.unwrap();
    assert!(t.ttft_ms > 0.0 && t.total_ms >= t.ttft_ms && t.decode_ms >= 0.0 && t.prefill_ms > 0.0);

    // Stop string: the text ends before it, the reason says so.
    let mut req = chat_request(&[("user", "Describe the sea in three sentences.")], 64);
    let full = collect(&mut c, req.clone()).await;
    let words: Vec<&str> = full.text.split_whitespace().collect();
    assert!(words.len() > 3, "{:?}", full.text);
    let stop = words[2].to_string();
    req.stopping.as_mut().unwrap().stop = vec![stop.clone()];
    let cut = collect(&mut c, req).await;
    assert_eq!(cut.finish_reason(), pb::FinishReason::Stop);
    assert_eq!(cut.complete.as_ref().unwrap().stop_matched, stop);
    assert!(
        full.text.starts_with(&cut.text) && !cut.text.contains(&stop),
        "{:?} / {:?}",
        cut.text,
        full.text
    );

    // Model info: geometry, bytes per token falling with the width, the profile found automatically.
    assert_eq!(info.layers, 30);
    assert_eq!(info.context_length, 8192);
    let bytes: Vec<(u32, u64)> = info.kv_bytes_per_token.iter().map(|b| (b.bits, b.bytes)).collect();
    assert_eq!(bytes.iter().map(|b| b.0).collect::<Vec<_>>(), vec![16, 8, 4, 2]);
    assert!(bytes.windows(2).all(|w| w[0].1 > w[1].1), "{bytes:?}");
    let p = info
        .profile
        .expect("profiles/default.profile.json is loaded by default");
    assert_eq!(p.layer_bits.len(), 30);
    assert_eq!(info.default_kv_method, "pmkvq");

    // Tokenize agrees with the model's tokenizer.
    let tk = c
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Text("Hello, world!".into())),
        })
        .await
        .unwrap()
        .into_inner();
    let (_, tok) = common::load_default(1);
    assert_eq!(tk.ids, tok.encode("Hello, world!", true).unwrap());
    assert_eq!(tk.pieces.concat(), "Hello, world!");

    // Time limit: a long generation ends with its own reason.
    let mut req = text_request("Once upon a time", 4000);
    let st = req.stopping.as_mut().unwrap();
    st.time_limit_ms = Some(300);
    st.ignore_eos = Some(true);
    let timed = collect(&mut c, req).await;
    assert_eq!(timed.finish_reason(), pb::FinishReason::TimeLimit);
    assert!(timed.ids.len() < 4000);
    server.stop().await;
}
