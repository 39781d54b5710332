//! A Q4_K and a Q6_K matrix (2048 × 2048, random codes and scales) multiplied by 1 and by 512 activation rows, on
//! 2 worker threads: through candle's `QMatMul` (exact K-quant × Q8_K) and on our kernels as the loader lays
//! them out (Q4_K as Q4_1 blocks, Q6_K as Q6K32 panels: `cpu::q4_k_to_q4_1`, `cpu::q6_k_to_q6k32`). The
//! end-to-end effect on a real file is in README (Gemma-3-270M).
//!   cargo bench --bench kquant_matmul

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pmkvq::model::linear::{Linear, WeightData};
use std::time::Duration;

const N: usize = 2048;

fn random_blocks(super_bytes: usize, seed: &mut u64) -> Vec<u8> {
    let mut next = || {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (*seed >> 56) as u8
    };
    let mut out = Vec::new();
    for _ in 0..N * N / 256 {
        // Q4_K: d, dmin first; Q6_K: d last. Both get sane f16 scales where they are, random bytes elsewhere.
        let mut b: Vec<u8> = (0..super_bytes).map(|_| next()).collect();
        let d = half::f16::from_f32(next() as f32 / 20000.0 + 1e-4).to_le_bytes();
        let at = if super_bytes == 144 { 0 } else { super_bytes - 2 };
        b[at..at + 2].copy_from_slice(&d);
        if super_bytes == 144 {
            b[2..4].copy_from_slice(&half::f16::from_f32(next() as f32 / 40000.0).to_le_bytes());
        }
        out.extend(b);
    }
    out
}

fn matrices(dtype: candle_core::quantized::GgmlDType, bytes: &[u8]) -> (Linear, Linear) {
    use pmkvq::cpu::BlockFormat;
    let qt = candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, bytes, vec![N, N], &candle_core::Device::Cpu)
        .unwrap();
    let candle = Linear {
        rows: N,
        cols: N,
        data: WeightData::Candle(candle_core::quantized::QMatMul::from_qtensor(qt).unwrap()),
        bias: None,
    };
    let (format, ours) = match dtype {
        candle_core::quantized::GgmlDType::Q4K => (BlockFormat::Q4_1, pmkvq::cpu::q4_k_to_q4_1(bytes).unwrap()),
        _ => (BlockFormat::Q6K32, pmkvq::cpu::q6_k_to_q6k32(bytes).unwrap()),
    };
    let ours = Linear {
        rows: N,
        cols: N,
        data: WeightData::Blocks { format, bytes: ours },
        bias: None,
    }
    .for_kernels(pmkvq::cpu::kernels());
    (candle, ours)
}

fn bench(c: &mut Criterion) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let sets = [
        (
            "q4_k",
            matrices(candle_core::quantized::GgmlDType::Q4K, &random_blocks(144, &mut 7)),
        ),
        (
            "q6_k",
            matrices(candle_core::quantized::GgmlDType::Q6K, &random_blocks(210, &mut 8)),
        ),
    ];
    for (kind, (candle, ours)) in &sets {
        for t in [1usize, 512] {
            let x: Vec<f32> = (0..t * N).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let mut g = c.benchmark_group(format!("{kind} {N}x{N}, {t} rows"));
            g.throughput(Throughput::Elements((t * N * N) as u64));
            g.sample_size(10).measurement_time(Duration::from_secs(4));
            for (name, l) in [("candle QMatMul", candle), ("ours", ours)] {
                g.bench_function(name, |b| b.iter(|| pool.install(|| l.forward(&x, t).unwrap())));
            }
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
