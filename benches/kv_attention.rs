//! One decode-step attention for one layer (spec'd shapes: SmolLM2's 9 q / 3 KV heads at d = 64, and
//! Qwen2.5-7B-style 28 / 4 at d = 128) over contexts of 1k/4k/8k tokens, for the f16 cache and for 8/4/2-bit
//! bodies (fixed width, so each number is one width). One thread (`PMKVQ_BENCH_THREADS` for more): the figure is
//! the time per layer-step, and the throughput the bandwidth reached over the bytes the step reads.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pmkvq::kvcache::quant::Bits;
use pmkvq::kvcache::{F16KvStore, KvGeometry, KvStore, PmkvqConfig, PmkvqStore};
use std::time::Duration;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
        })
        .collect()
}

fn store(kind: &str, geom: KvGeometry, ctx: usize) -> Box<dyn KvStore> {
    let mut s: Box<dyn KvStore> = match kind {
        "fp16" => Box::new(F16KvStore::new(geom, ctx + 1)),
        b => {
            let bits = Bits::from_count(b.trim_end_matches("bit").parse().unwrap()).unwrap();
            Box::new(PmkvqStore::new(geom, PmkvqConfig::rtn(bits), &[usize::MAX], ctx + 1).unwrap())
        }
    };
    let kv = geom.kv_dim();
    for c in 0..ctx.div_ceil(1024) {
        let n = 1024.min(ctx - c * 1024);
        s.append(0, &values(n * kv, c as u64 + 1), &values(n * kv, c as u64 + 1000), n)
            .unwrap();
    }
    s
}

fn bench(c: &mut Criterion) {
    let threads = std::env::var("PMKVQ_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let shapes = [
        (
            "9q3kv_d64",
            KvGeometry {
                layers: 1,
                q_heads: 9,
                kv_heads: 3,
                head_dim: 64,
            },
        ),
        (
            "28q4kv_d128",
            KvGeometry {
                layers: 1,
                q_heads: 28,
                kv_heads: 4,
                head_dim: 128,
            },
        ),
    ];
    for (name, geom) in shapes {
        let mut g = c.benchmark_group(format!("kv_attention/{name}"));
        g.sample_size(20)
            .measurement_time(Duration::from_secs(3))
            .warm_up_time(Duration::from_millis(500));
        let q = values(geom.q_dim(), 7);
        let (k, v) = (values(geom.kv_dim(), 8), values(geom.kv_dim(), 9));
        for ctx in [1024usize, 4096, 8192] {
            for kind in ["fp16", "8bit", "4bit", "2bit"] {
                let mut s = store(kind, geom, ctx);
                let mut out = vec![0f32; geom.q_dim()];
                // every stored byte (codes, scales, offsets) is read once per step: criterion's throughput is
                // the bandwidth the kernel reaches
                let bytes = s.true_bytes();
                eprintln!("{name}/{kind}/{ctx}: {bytes} bytes of K/V read per step");
                g.throughput(Throughput::Bytes(bytes as u64));
                g.bench_with_input(BenchmarkId::new(kind, ctx), &ctx, |b, &ctx| {
                    // inside the pool, as the forward pass runs (a call into the pool from outside would time
                    // two thread hand-offs per step)
                    pool.install(|| {
                        b.iter(|| {
                            s.attend_and_store(0, &q, &k, &v, 1, &mut out).unwrap();
                            s.truncate(ctx);
                        })
                    })
                });
            }
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
