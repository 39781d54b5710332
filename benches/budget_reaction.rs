//! Budget-change reaction time: from sending SetMemoryBudget to the first engine snapshot (WatchStatus) in which
//! the new budget is applied and every sequence's KV fits it — with one sequence at 1k and at 8k tokens of context.
//! Each context gets four successive cuts (to 80, 60, 45 and 35 % of the 16-bit bytes); medians are printed.
//!
//! `cargo bench --bench budget_reaction`. Under `cargo test` (no `--bench`) it runs one short smoke pass.

use pmkvq::server::proto::{
    self as pb, pmkvq_admin_client::PmkvqAdminClient, pmkvq_service_client::PmkvqServiceClient,
};
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("PMKVQ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models").join(pmkvq::fetch::DEFAULT_MODEL_FILE));
    let (_, tok) = pmkvq::model::Model::load(&model, &pmkvq::model::LoadOptions { threads: 1 })
        .unwrap_or_else(|e| panic!("{e} (run deploy/fetch-model.sh first)"));
    let text = std::fs::read_to_string(root.join("../shared/data/text/botchan.txt")).expect("botchan.txt");
    let ids = tok.encode(&text, false).expect("tokenize");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let contexts: &[usize] = if full { &[1024, 8000] } else { &[256] };
    let cuts: &[f64] = if full { &[0.8, 0.6, 0.45, 0.35] } else { &[0.6] };
    rt.block_on(async {
        let cfg = pmkvq::config::from_pairs(&[
            ("model", model.to_str().unwrap()),
            ("log.filter", "warn"),
            ("engine.kv_state_every", "0"),
        ])
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(pmkvq::app::run(cfg, pmkvq::server::Listener::Tcp(listener), async {
            let _ = stopped.await;
        }));
        let mut c = loop {
            if let Ok(mut c) = PmkvqServiceClient::connect(url.clone()).await {
                if c.get_status(pb::GetStatusRequest {})
                    .await
                    .is_ok_and(|s| s.into_inner().ready)
                {
                    break c;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let mut admin = PmkvqAdminClient::connect(url.clone()).await.unwrap();
        for &ctx in contexts {
            admin
                .set_memory_budget(pb::SetMemoryBudgetRequest {
                    budget: Some(pb::set_memory_budget_request::Budget::Automatic(true)),
                })
                .await
                .unwrap();
            let req = pb::GenerateRequest {
                input: Some(pb::generate_request::Input::Tokens(pb::TokenIds {
                    ids: ids[..ctx].to_vec(),
                })),
                stopping: Some(pb::StoppingCriteria {
                    max_tokens: Some(4000),
                    ignore_eos: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let mut stream = c.generate(req).await.unwrap().into_inner();
            // Keep reading so the sequence never pauses.
            let reader = tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} });
            let mut watch = admin
                .watch_status(pb::WatchStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let full_bytes = loop {
                let st = watch.message().await.unwrap().unwrap().status.unwrap();
                if let Some(q) = st.sequences.first() {
                    if q.generated_tokens >= 2 {
                        break q.kv.as_ref().unwrap().true_bytes;
                    }
                }
            };
            let mut times = Vec::new();
            for &f in cuts {
                let target = (full_bytes as f64 * f) as u64;
                let t0 = Instant::now();
                admin
                    .set_memory_budget(pb::SetMemoryBudgetRequest {
                        budget: Some(pb::set_memory_budget_request::Budget::Bytes(target)),
                    })
                    .await
                    .unwrap();
                loop {
                    let st = watch.message().await.unwrap().unwrap().status.unwrap();
                    if st.kv_budget_bytes == target && st.kv_true_bytes <= target {
                        assert!(!st.sequences.is_empty(), "the sequence must survive a cut to {f}");
                        break;
                    }
                }
                times.push(t0.elapsed().as_secs_f64() * 1e3);
            }
            reader.abort();
            let mut sorted = times.clone();
            sorted.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "budget_reaction ctx {ctx}: median {:.1} ms (cuts to {:?} of {full_bytes} bytes: {:?} ms)",
                sorted[sorted.len() / 2],
                cuts,
                times.iter().map(|t| format!("{t:.1}")).collect::<Vec<_>>()
            );
            drop(watch);
            // Let the engine drop the cancelled sequence before the next context.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let _ = stop.send(());
        let _ = server.await;
    });
}
