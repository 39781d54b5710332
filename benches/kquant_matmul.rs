//! One Q4_K matrix (2048 × 2048, random codes and scales) multiplied by 1 and by 512 activation rows, on 2 worker
//! threads: through candle's `QMatMul` (exact Q4_K × Q8_K) and as Q4_1 blocks on our kernels
//! (`cpu::q4_k_to_q4_1`, the loader's path). The end-to-end effect on a real file is in README (Gemma-3-270M).
//!   cargo bench --bench kquant_matmul

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pmkvq::model::linear::{Linear, WeightData};
use std::time::Duration;

const N: usize = 2048;

fn random_q4k(seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 56) as u8
    };
    let mut out = Vec::new();
    for _ in 0..N * N / 256 {
        out.extend_from_slice(&half::f16::from_f32(next() as f32 / 20000.0 + 1e-4).to_le_bytes());
        out.extend_from_slice(&half::f16::from_f32(next() as f32 / 40000.0).to_le_bytes());
        out.extend((0..140).map(|_| next()));
    }
    out
}

fn bench(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let bytes = random_q4k(&mut 7);
    let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(
        candle_core::quantized::GgmlDType::Q4K,
        &bytes,
        vec![N, N],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let candle = Linear {
        rows: N,
        cols: N,
        data: WeightData::Candle(candle_core::quantized::QMatMul::from_qtensor(qt).unwrap()),
        bias: None,
    };
    let ours = Linear {
        rows: N,
        cols: N,
        data: WeightData::Blocks {
            format: pmkvq::cpu::BlockFormat::Q4_1,
            bytes: pmkvq::cpu::q4_k_to_q4_1(&bytes).unwrap(),
        },
        bias: None,
    }
    .for_kernels(pmkvq::cpu::kernels());
    for t in [1usize, 512] {
        let x: Vec<f32> = (0..t * N).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
        let mut g = c.benchmark_group(format!("q4_k {N}x{N}, {t} rows"));
        g.throughput(Throughput::Elements((t * N * N) as u64));
        g.sample_size(10).measurement_time(Duration::from_secs(4));
        for (name, l) in [("candle QMatMul", &candle), ("ours, as Q4_1", &ours)] {
            g.bench_function(name, |b| b.iter(|| pool.install(|| l.forward(&x, t).unwrap())));
        }
        g.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
