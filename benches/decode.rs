//! One decode step and a 512-token prefill on the default model, 2 worker threads (llama-bench's `-t 2`).
//! Compare with `llama-bench -m models/SmolLM2-135M-Instruct.Q4_1.gguf -t 2 -p 512 -n 128 -d 0,2048`
//! (`scripts/bench-vs-llamacpp.sh` runs both). Threads: `PMKVQ_BENCH_THREADS` (default 2).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pmkvq::kvcache::{F16KvStore, KvStore};
use pmkvq::model::{LoadOptions, LogitsMode, Model, SeqInput};
use std::path::PathBuf;
use std::time::Duration;

fn setup() -> (Model, Vec<u32>) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model_path = std::env::var_os("PMKVQ_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models").join(pmkvq::fetch::DEFAULT_MODEL_FILE));
    let threads = std::env::var("PMKVQ_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let (model, tok) = Model::load(&model_path, &LoadOptions { threads })
        .unwrap_or_else(|e| panic!("{e} (run deploy/fetch-model.sh first)"));
    let text_path = root.join("../shared/data/text/botchan.txt");
    let text = std::fs::read_to_string(&text_path).unwrap_or_else(|e| panic!("{}: {e}", text_path.display()));
    let ids = tok.encode(&text, false).expect("tokenize");
    assert!(ids.len() > 2200, "need 2200 tokens of text");
    (model, ids)
}

fn decode_at(c: &mut Criterion, model: &Model, ids: &[u32], ctx: usize) {
    let mut kv = F16KvStore::new(model.kv_geometry(), model.config.context_length);
    model
        .forward_chunked(&ids[..ctx], &mut kv, 512, LogitsMode::None)
        .expect("prefill");
    let mut g = c.benchmark_group("decode");
    g.throughput(Throughput::Elements(1));
    g.sample_size(30).measurement_time(Duration::from_secs(8));
    g.bench_function(format!("ctx{ctx}"), |b| {
        b.iter(|| {
            let pos = [ctx as u32];
            let out = model
                .forward(
                    &[SeqInput {
                        tokens: &ids[ctx..ctx + 1],
                        positions: &pos,
                    }],
                    &mut [&mut kv],
                    LogitsMode::Last,
                )
                .expect("step");
            kv.truncate(ctx);
            out
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    let (model, ids) = setup();
    let mut g = c.benchmark_group("prefill");
    g.throughput(Throughput::Elements(512));
    g.sample_size(10).measurement_time(Duration::from_secs(15));
    g.bench_function("512", |b| {
        b.iter(|| {
            let mut kv = F16KvStore::new(model.kv_geometry(), 1024);
            model
                .forward_chunked(&ids[..512], &mut kv, 512, LogitsMode::Last)
                .expect("prefill")
        })
    });
    g.finish();
    decode_at(c, &model, &ids, 128);
    decode_at(c, &model, &ids, 2048);
}

criterion_group!(benches, bench);
criterion_main!(benches);
