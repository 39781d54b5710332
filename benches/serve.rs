//! Batched decode through the daemon over real loopback gRPC: total tokens/s of 1, 4 and 8 concurrent greedy
//! streams (64 tokens each, EOS ignored). The ratio to one stream is what continuous batching buys: each
//! engine step decodes every running stream with one pass over the weights.
//! Threads: `PMKVQ_BENCH_THREADS` (default 2). Model: `PMKVQ_MODEL` or the default model.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pmkvq::server::proto::{self as pb, pmkvq_service_client::PmkvqServiceClient};
use std::path::PathBuf;
use std::time::Duration;

const TOKENS: u32 = 64;

fn request(i: usize) -> pb::GenerateRequest {
    pb::GenerateRequest {
        input: Some(pb::generate_request::Input::Text(format!(
            "Story {i}: once upon a time"
        ))),
        stopping: Some(pb::StoppingCriteria {
            max_tokens: Some(TOKENS),
            ignore_eos: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn one_stream(url: String, i: usize) -> usize {
    let mut c = PmkvqServiceClient::connect(url).await.expect("connect");
    let mut s = c.generate(request(i)).await.expect("generate").into_inner();
    let mut n = 0;
    while let Some(m) = s.message().await.expect("message") {
        if let Some(pb::generate_response::Kind::Chunk(ch)) = m.kind {
            n += ch.token_ids.len();
        }
    }
    n
}

fn bench(c: &mut Criterion) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = std::env::var_os("PMKVQ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models").join(pmkvq::fetch::DEFAULT_MODEL_FILE));
    let threads = std::env::var("PMKVQ_BENCH_THREADS").unwrap_or_else(|_| "2".into());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let cfg = pmkvq::config::from_pairs(&[
        ("model", model.to_str().unwrap()),
        ("threads", &threads),
        ("engine.max_running", "8"),
        ("log.filter", "warn"),
    ])
    .unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(pmkvq::app::run(cfg, pmkvq::server::Listener::Tcp(listener), async {
        let _ = stop_rx.await;
    }));
    // Wait until the model is loaded and warm.
    rt.block_on(async {
        loop {
            if let Ok(mut c) = PmkvqServiceClient::connect(url.clone()).await {
                if let Ok(s) = c.get_status(pb::GetStatusRequest {}).await {
                    if s.into_inner().ready {
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut g = c.benchmark_group("grpc_batched_decode");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for streams in [1usize, 4, 8] {
        g.throughput(Throughput::Elements(streams as u64 * TOKENS as u64));
        g.bench_function(format!("{streams}_streams"), |b| {
            b.iter(|| {
                rt.block_on(async {
                    let tasks: Vec<_> = (0..streams).map(|i| tokio::spawn(one_stream(url.clone(), i))).collect();
                    let mut total = 0;
                    for t in tasks {
                        total += t.await.unwrap();
                    }
                    assert_eq!(total, streams * TOKENS as usize);
                })
            })
        });
    }
    g.finish();
    let _ = stop_tx.send(());
    let _ = rt.block_on(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
