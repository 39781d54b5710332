//! Gemma-3-270M served by pmkvqd end to end over real gRPC: greedy tokens equal llama.cpp's, and a trace past
//! the 512-token sliding window takes an operator's budget cut — its global layers lowered within a step, its
//! windows kept at f16, the budget never exceeded afterwards.

mod common;

use common::daemon::{collect, collect_stream, start_server_model, status, text_request};
use pmkvq::kvcache::{fp16_bytes, Windowing};
use pmkvq::server::proto::{self as pb, pmkvq_admin_client::PmkvqAdminClient};
use std::path::PathBuf;

fn gemma_path() -> PathBuf {
    let p = std::env::var_os("PMKVQ_GEMMA_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/gemma-3-270m-q4_k_m.gguf"));
    assert!(
        p.exists(),
        "Gemma-3-270M missing at {}: run `deploy/fetch-model.sh models gemma3` (the test command does)",
        p.display()
    );
    p
}

fn golden() -> serde_json::Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden/gemma3-270m.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gemma_generates_llama_cpps_greedy_tokens_over_grpc() {
    let server = start_server_model(&gemma_path(), &[]).await;
    let mut c = server.client().await;
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    assert_eq!((info.layers, info.architecture.as_str()), (18, "gemma3"));
    let g = golden();
    // the shared prompts' greedy tokens, with an fp16 cache, through the first low-margin step (the threshold
    // tests/gemma_parity.rs derives from the peer's own spread)
    let min_margin = 2.0
        * g["peer_noise"]["flip_margins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .fold(0.1, f64::max);
    for case in g["cases"].as_array().unwrap().iter().take(3) {
        let greedy = ids(&case["greedy_ids"]);
        let upto = case["greedy_margins"]
            .as_array()
            .unwrap()
            .iter()
            .position(|m| m.as_f64().unwrap() < min_margin)
            .unwrap_or(greedy.len());
        let mut req = text_request(case["prompt_text"].as_str().unwrap(), upto.max(1) as u32);
        req.kv = Some(pb::KvPolicy {
            method: Some("fp16".into()),
            ..Default::default()
        });
        let out = collect(&mut c, req).await;
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(
            &out.ids[..upto.min(out.ids.len())],
            &greedy[..upto.min(out.ids.len())],
            "{}",
            case["id"]
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cut_past_the_window_lowers_the_global_layers_and_is_never_exceeded() {
    let server = start_server_model(&gemma_path(), &[("engine.kv_state_every", "1")]).await;
    let mut c = server.client().await;
    let mut admin = PmkvqAdminClient::connect(server.url()).await.unwrap();
    let info = c.get_model_info(pb::GetModelInfoRequest {}).await.unwrap().into_inner();
    let (cut_at, total) = (900usize, 1100u32);
    let mut req = text_request("Once upon a time, in a lighthouse at the edge of the world,", total);
    req.stopping.as_mut().unwrap().ignore_eos = Some(true);
    req.request_id = "long".into();
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut n = 0;
    while n < cut_at {
        if let Some(pb::generate_response::Kind::Chunk(ch)) = stream.message().await.unwrap().unwrap().kind {
            n += ch.token_ids.len();
        }
    }
    let before = status(&mut c).await;
    let seq = before.sequences.iter().find(|s| s.request_id == "long").unwrap();
    let kv = seq.kv.as_ref().unwrap();
    assert!(kv.layer_bits.iter().all(|&b| b == 16), "{:?}", kv.layer_bits);
    // The windows' bounded share (what the store sets aside) plus 45 % of what the three global layers hold at
    // f16 now: above their 2-bit floor, far below their 16-bit size.
    let geom = pmkvq::kvcache::KvGeometry {
        layers: info.layers as usize,
        q_heads: info.heads as usize,
        kv_heads: info.kv_heads as usize,
        head_dim: info.head_dim as usize,
    };
    let win = Windowing {
        window: 512,
        local: (0..18).map(|l| (l + 1) % 6 != 0).collect(),
    };
    let windows = win.local_bytes(geom, total as usize + 64);
    let globals_now = fp16_bytes(geom, Some(&win), kv.tokens as usize) - win.local_bytes(geom, kv.tokens as usize);
    let target = (windows + globals_now * 45 / 100) as u64;
    admin
        .set_memory_budget(pb::SetMemoryBudgetRequest {
            budget: Some(pb::set_memory_budget_request::Budget::Bytes(target)),
        })
        .await
        .unwrap();
    let rest = collect_stream(stream).await;
    assert_eq!(rest.finish_reason(), pb::FinishReason::Length, "{:?}", rest.error);
    let after: Vec<_> = rest
        .kv_states
        .iter()
        .map(|(_, kv)| kv)
        .filter(|kv| kv.tokens as usize > n + 8)
        .collect();
    assert!(!after.is_empty());
    for kv in &after {
        assert!(
            kv.true_bytes <= target,
            "{} bytes at {} tokens over {target}",
            kv.true_bytes,
            kv.tokens
        );
        for (l, &b) in kv.layer_bits.iter().enumerate() {
            if win.local[l] {
                assert_eq!(b, 16, "local layer {l} keeps its window at f16");
            }
        }
    }
    let last = after.last().unwrap();
    assert!(
        win.globals().iter().any(|&l| last.layer_bits[l] < 16),
        "the global layers were lowered: {:?}",
        last.layer_bits
    );
    assert!(
        last.tokens > total,
        "{} tokens held at the end (prompt + {total} generated)",
        last.tokens
    );
    server.stop().await;
}
