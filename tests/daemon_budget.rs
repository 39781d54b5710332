//! The live KV budget over real gRPC: an operator's cut applies within one step and is never exceeded,
//! preemption spills and resumes bit-exactly, a cut below a lone sequence's floor finishes it, admission refuses
//! what can never fit and accepts it once the budget is raised.

mod common;

use common::daemon::{collect, collect_stream, start_server, status, text_request, wait_status, Client};
use pmkvq::server::proto::{self as pb, pmkvq_admin_client::PmkvqAdminClient};
use std::time::Duration;
use tonic::transport::Channel;

type Admin = PmkvqAdminClient<Channel>;

async fn admin(server: &common::daemon::TestServer) -> Admin {
    PmkvqAdminClient::connect(server.url()).await.unwrap()
}

async fn set_bytes(a: &mut Admin, bytes: u64) -> pb::SetMemoryBudgetResponse {
    a.set_memory_budget(pb::SetMemoryBudgetRequest {
        budget: Some(pb::set_memory_budget_request::Budget::Bytes(bytes)),
    })
    .await
    .expect("SetMemoryBudget")
    .into_inner()
}

fn endless(text: &str, max_tokens: u32, priority: i32) -> pb::GenerateRequest {
    let mut r = text_request(text, max_tokens);
    r.stopping.as_mut().unwrap().ignore_eos = Some(true);
    r.kv = Some(pb::KvPolicy {
        priority: Some(priority),
        ..Default::default()
    });
    r
}

fn seq<'a>(s: &'a pb::ServerStatus, id: &str) -> Option<&'a pb::SequenceStatus> {
    s.sequences.iter().find(|q| q.request_id == id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_cut_applies_within_one_step_and_is_never_exceeded() {
    let server = start_server(&[("engine.kv_state_every", "1")]).await;
    let mut c = server.client().await;
    let mut a = admin(&server).await;
    let mut watch = a.watch_status(pb::WatchStatusRequest {}).await.unwrap().into_inner();
    // A quarter of the 16-bit bytes is above the 2-bit floor (the 16-bit sink and 128-token window included)
    // only once the body dominates: cut at 1500 tokens, then generate 150 more under the cut.
    let mut req = endless("Write a long story about a lighthouse keeper.", 1650, 0);
    req.request_id = "long".into();
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut n = 0;
    while n < 1500 {
        if let Some(pb::generate_response::Kind::Chunk(ch)) = stream.message().await.unwrap().unwrap().kind {
            n += ch.token_ids.len();
        }
    }
    let before = status(&mut c).await;
    let used = before.kv_true_bytes;
    let bits_before = seq(&before, "long").unwrap().kv.as_ref().unwrap().layer_bits.clone();
    assert!(bits_before.iter().all(|&b| b == 16), "{bits_before:?}");
    let target = used / 4;
    let resp = set_bytes(&mut a, target).await;
    assert_eq!(resp.budget_bytes, target);
    assert_eq!(resp.source, pb::BudgetSource::Operator as i32);
    let steps_at_cut = status(&mut c).await.steps;
    // From the watch stream: lower bits within one step of the cut, and never over the budget afterwards.
    let mut lowered_at = None;
    let mut cut_tokens = u32::MAX;
    let mut seen_after = 0;
    while seen_after < 40 {
        let u = watch.message().await.unwrap().unwrap();
        let st = u.status.unwrap();
        if st.kv_budget_bytes != target {
            continue;
        }
        seen_after += 1;
        assert!(
            st.kv_true_bytes <= target,
            "step {}: {} bytes held over a {target}-byte budget",
            st.steps,
            st.kv_true_bytes
        );
        if let Some(q) = seq(&st, "long") {
            let bits = &q.kv.as_ref().unwrap().layer_bits;
            if lowered_at.is_none() {
                lowered_at = Some((st.steps, bits.iter().any(|&b| b < 16)));
                cut_tokens = q.kv.as_ref().unwrap().tokens;
            }
        }
        assert!(u.memory.unwrap().host_total > 0);
    }
    // The first snapshot under the new budget already shows lower bits: the budget is applied before the step
    // that follows it (snapshots a slow reader missed are coalesced, hence the small margin on the step count).
    let (first_step, lowered) = lowered_at.expect("a snapshot under the new budget");
    assert!(
        lowered,
        "the first step under the new budget must already have lower bits"
    );
    assert!(
        first_step <= steps_at_cut + 3,
        "applied at step {first_step}, cut at {steps_at_cut}"
    );
    // Generation continues to the end, under budget.
    let rest = collect_stream(stream).await;
    assert_eq!(rest.finish_reason(), pb::FinishReason::Length);
    // The stream's own KV states after the cut (earlier ones were still buffered in transit) agree.
    let after_cut: Vec<_> = rest.kv_states.iter().filter(|(_, kv)| kv.tokens > cut_tokens).collect();
    assert!(!after_cut.is_empty());
    for (_, kv) in after_cut {
        assert!(
            kv.true_bytes <= target,
            "{} bytes at {} tokens",
            kv.true_bytes,
            kv.tokens
        );
    }
    let after = status(&mut c).await;
    assert!(after.requantizations > 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_spills_and_resumes_bit_exactly_then_a_floor_cut_finishes() {
    let spill = tempfile::tempdir().unwrap();
    let dir = spill.path().to_str().unwrap().to_string();
    let server = start_server(&[("engine.spill_dir", &dir)]).await;
    let mut c = server.client().await;
    let mut a = admin(&server).await;
    // The low-priority sequence is PM-KVQ (calibrated, key-scaled: the daemon's default) with `min_bits = 16`, so
    // its floor is its 16-bit size and a cut must preempt it rather than quantize it: whatever the cut's timing,
    // its tokens must equal an uninterrupted run's.
    let mut low = endless("The history of the lighthouse begins", 300, -10);
    low.request_id = "low".into();
    low.kv.as_mut().unwrap().min_bits = Some(16);
    let mut high = endless("Dear diary, today I", 600, 10);
    high.request_id = "high".into();
    // Uninterrupted references.
    let low_alone = collect(&mut c, low.clone()).await;
    let high_alone = collect(&mut c, high.clone()).await;

    let hs = c.generate(high.clone()).await.unwrap().into_inner();
    let ls = c.generate(low.clone()).await.unwrap().into_inner();
    let mid = wait_status(&mut c, Duration::from_secs(30), |s| {
        seq(s, "low").is_some_and(|q| q.generated_tokens >= 150) && seq(s, "high").is_some()
    })
    .await;
    // 6 MiB: below what both need (the 16-bit cache alone is ~4 MiB at 180 tokens and grows 23 KiB a token),
    // above the PM-KVQ sequence's 2-bit floor all the way to its 600th token (~4.9 MB).
    let cut = 6u64 << 20;
    assert!(cut < mid.kv_true_bytes);
    set_bytes(&mut a, cut).await;
    let pre = wait_status(&mut c, Duration::from_secs(10), |s| {
        seq(s, "low").is_some_and(|q| q.state == pb::SequenceState::Preempted as i32)
    })
    .await;
    assert!(pre.preemptions >= 1);
    assert_eq!(
        seq(&pre, "low").unwrap().kv.as_ref().unwrap().true_bytes,
        0,
        "spilled: no KV in memory"
    );
    assert!(
        std::fs::read_dir(spill.path()).unwrap().count() >= 1,
        "a spill file exists"
    );
    // Room returns: the low-priority one resumes and both end exactly as uninterrupted runs.
    set_bytes(&mut a, 1 << 30).await;
    let low_got = collect_stream(ls).await;
    let high_got = collect_stream(hs).await;
    // The high-priority one kept running under the cut (its cache quantized), to its end.
    assert_eq!(high_got.finish_reason(), pb::FinishReason::Length);
    assert_eq!(high_got.ids.len(), high_alone.ids.len());
    let first_diff = low_got.ids.iter().zip(&low_alone.ids).position(|(a, b)| a != b);
    assert_eq!(
        low_got.ids,
        low_alone.ids,
        "resumed bit-exactly (first difference at {first_diff:?}, preempted at {} tokens)",
        seq(&pre, "low").unwrap().generated_tokens
    );
    let done = status(&mut c).await;
    assert!(done.resumptions >= 1);
    assert_eq!(
        std::fs::read_dir(spill.path()).unwrap().count(),
        0,
        "spill files are removed"
    );

    // A cut below a lone sequence's floor finishes it with the memory-pressure reason; the daemon stays healthy.
    let s = c
        .generate(endless("Once upon a time", 800, 0))
        .await
        .unwrap()
        .into_inner();
    wait_status(&mut c, Duration::from_secs(30), |s| {
        s.sequences.first().is_some_and(|q| q.generated_tokens > 200)
    })
    .await;
    set_bytes(&mut a, 4096).await;
    let cut_off = collect_stream(s).await;
    assert_eq!(cut_off.finish_reason(), pb::FinishReason::MemoryPressure);
    set_bytes(&mut a, 1 << 30).await;
    let ok = collect(&mut c, text_request("The capital of France is", 8)).await;
    assert_eq!(ok.ids.len(), 8);
    server.stop().await;
}

async fn refused(c: &mut Client, req: pb::GenerateRequest) -> tonic::Status {
    c.generate(req).await.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_refuses_what_can_never_fit_and_accepts_it_after_a_raise() {
    let server = start_server(&[("memory.budget", "2MiB")]).await;
    let mut c = server.client().await;
    let mut a = admin(&server).await;
    let big = endless("Tell me everything about the sea.", 6000, 0);
    let st = refused(&mut c, big.clone()).await;
    assert_eq!(st.code(), tonic::Code::ResourceExhausted, "{}", st.message());
    let msg = st.message();
    assert!(
        msg.contains("bytes of KV cache") && msg.contains("the KV budget is 2097152 bytes"),
        "{msg}"
    );
    set_bytes(&mut a, 64 << 20).await;
    let mut s = c.generate(big).await.expect("accepted after the raise").into_inner();
    assert!(s.message().await.unwrap().is_some());
    drop(s);
    // Automatic again: the budget follows the machine.
    let auto = a
        .set_memory_budget(pb::SetMemoryBudgetRequest {
            budget: Some(pb::set_memory_budget_request::Budget::Automatic(true)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(auto.source, pb::BudgetSource::Operator as i32);
    let bad = a
        .set_memory_budget(pb::SetMemoryBudgetRequest {
            budget: Some(pb::set_memory_budget_request::Budget::Fraction(1.5)),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_calls_need_the_token_when_one_is_set() {
    let token = "s3cret-token-for-tests";
    let server = start_server(&[("auth.token", token)]).await;
    let mut a = admin(&server).await;
    let st = a
        .set_memory_budget(pb::SetMemoryBudgetRequest {
            budget: Some(pb::set_memory_budget_request::Budget::Bytes(1 << 20)),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    let st = a.watch_status(pb::WatchStatusRequest {}).await.err().unwrap();
    assert_eq!(st.code(), tonic::Code::Unauthenticated);
    let mut req = tonic::Request::new(pb::SetMemoryBudgetRequest {
        budget: Some(pb::set_memory_budget_request::Budget::Bytes(1 << 20)),
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let ok = a.set_memory_budget(req).await.unwrap().into_inner();
    assert_eq!(ok.budget_bytes, 1 << 20);
    // Generation needs no token.
    let mut c = server.client().await;
    assert_eq!(collect(&mut c, text_request("Hi", 2)).await.ids.len(), 2);
    server.stop().await;
}

#[test]
fn a_non_loopback_listener_without_a_token_refuses_to_start() {
    let err = pmkvq::config::from_pairs(&[("listen", "0.0.0.0:50051")]).expect_err("refused");
    assert!(err.to_string().contains("auth.token"), "{err}");
    assert!(pmkvq::config::from_pairs(&[("listen", "0.0.0.0:50051"), ("auth.token", "0123456789abcdef0123")]).is_ok());
    assert!(pmkvq::config::from_pairs(&[("listen", "0.0.0.0:50051"), ("auth.allow_insecure_remote", "true")]).is_ok());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pmkvqd"))
        .args(["--listen", "0.0.0.0:0"])
        .env_remove("PMKVQ_AUTH_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preemption_past_the_spill_quota_ends_the_victim_and_leaves_no_file() {
    let spill = tempfile::tempdir().unwrap();
    let dir = spill.path().to_str().unwrap().to_string();
    // the low-priority cache is ~4 MiB when the cut comes: far past a 64 KiB quota
    let server = start_server(&[("engine.spill_dir", &dir), ("engine.spill_max_bytes", "64KiB")]).await;
    let mut c = server.client().await;
    let mut a = admin(&server).await;
    let mut low = endless("The history of the lighthouse begins", 300, -10);
    low.request_id = "low".into();
    low.kv.as_mut().unwrap().min_bits = Some(16);
    let mut high = endless("Dear diary, today I", 400, 10);
    high.request_id = "high".into();
    let hs = c.generate(high).await.unwrap().into_inner();
    let ls = c.generate(low).await.unwrap().into_inner();
    let mid = wait_status(&mut c, Duration::from_secs(30), |s| {
        seq(s, "low").is_some_and(|q| q.generated_tokens >= 150) && seq(s, "high").is_some()
    })
    .await;
    let cut = 6u64 << 20;
    assert!(cut < mid.kv_true_bytes);
    set_bytes(&mut a, cut).await;
    let low_got = collect_stream(ls).await;
    assert_eq!(
        low_got.finish_reason(),
        pb::FinishReason::MemoryPressure,
        "no room on disk either: the victim ends, its text so far intact"
    );
    assert!(low_got.ids.len() >= 150);
    set_bytes(&mut a, 1 << 30).await;
    let high_got = collect_stream(hs).await;
    assert_eq!(high_got.finish_reason(), pb::FinishReason::Length);
    assert_eq!(
        std::fs::read_dir(spill.path()).unwrap().count(),
        0,
        "no partial spill file is left"
    );
    assert_eq!(status(&mut c).await.preemptions, 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_a_tight_budget_every_request_that_fits_alone_completes() {
    // Room for about two of these at a time: the rest wait, or are preempted and resumed, but none ends with
    // memory_pressure — each fits the budget by itself. Every kind of cache takes part.
    let server = start_server(&[("memory.budget", "8MiB")]).await;
    let mut tasks = Vec::new();
    for (i, method) in ["pmkvq", "kivi:2", "fp16", "rtn:4", "pmkvq", "q4_0"]
        .into_iter()
        .enumerate()
    {
        let mut c = server.client().await;
        let mut r = endless(&format!("Story {i}: a lighthouse keeper finds a map."), 150, 0);
        r.kv.as_mut().unwrap().method = Some(method.into());
        r.request_id = format!("{method}-{i}");
        tasks.push(tokio::spawn(
            async move { (r.request_id.clone(), collect(&mut c, r).await) },
        ));
    }
    for t in tasks {
        let (id, got) = t.await.unwrap();
        assert!(got.error.is_none(), "{id}: {:?}", got.error);
        assert_eq!(got.finish_reason(), pb::FinishReason::Length, "{id}");
        assert_eq!(got.ids.len(), 150, "{id}");
    }
    let mut c = server.client().await;
    let s = wait_status(&mut c, Duration::from_secs(5), |s| s.sequences.is_empty()).await;
    assert!(s.preemptions > 0, "the budget was tight enough to preempt");
    assert_eq!(s.kv_true_bytes, 0);
    server.stop().await;
}

/// Issue 15 item 6: a lone sequence cut to a tight budget mid-trace keeps generating until the byte formula says
/// its floor no longer fits — the calibrated plan of the default profile and the daemon's own bookkeeping strand
/// nothing. The daemon's cache has the elastic window, so that floor is every layer's 16-bit sink and every other
/// token at 2 bits (the window yields), well past where a full window would have ended it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_sequence_runs_until_its_floor_no_longer_fits() {
    use pmkvq::kvcache::{PmkvqConfig, PmkvqStore};
    let (model, _) = pmkvq::model::Model::load(&common::default_model_path(), &Default::default()).unwrap();
    let geom = model.kv_geometry();
    drop(model);
    let server = start_server(&[]).await;
    let mut c = server.client().await;
    let mut a = admin(&server).await;
    let cut = 8_850_000u64;
    let mut req = endless("Write a long story about a lighthouse keeper.", 4000, 0);
    req.request_id = "cut".into();
    let mut stream = c.generate(req).await.unwrap().into_inner();
    let mut n = 0;
    while n < 1100 {
        if let Some(pb::generate_response::Kind::Chunk(ch)) = stream.message().await.unwrap().unwrap().kind {
            n += ch.token_ids.len();
        }
    }
    set_bytes(&mut a, cut).await;
    let rest = collect_stream(stream).await;
    assert_eq!(rest.finish_reason(), pb::FinishReason::MemoryPressure);
    let usage = rest.complete.as_ref().unwrap().usage.unwrap();
    let held = (usage.prompt_tokens + usage.completion_tokens) as usize;
    let fits_with = |cfg: &PmkvqConfig| {
        (0..8192)
            .take_while(|&t| PmkvqStore::floor_bytes(geom, cfg, t) <= cut as usize)
            .last()
            .unwrap()
    };
    let elastic = PmkvqConfig {
        elastic_window: true,
        ..PmkvqConfig::pmkvq()
    };
    let (fits, full_window) = (fits_with(&elastic), fits_with(&PmkvqConfig::pmkvq()));
    assert!(fits > full_window + 300, "{fits} vs {full_window}");
    eprintln!("ended at {held} tokens under {cut} bytes; the floor fits {fits}");
    // the step that ends it stores one more token than what fits; the final token is sampled, never stored
    assert!(
        held + 2 >= fits,
        "ended at {held} tokens under {cut} bytes; the 2-bit floor fits {fits} (with a full window {full_window})"
    );
    assert!(held <= fits + 2, "ended at {held} tokens, beyond the floor's {fits}");
    server.stop().await;
}
