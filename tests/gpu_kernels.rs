//! The CUDA kernels through the Rust launch wrappers (feature `cuda-kernels`), against the CPU specification:
//! quantize and every shrink mode bit for bit, decode attention within 1e-3 relative, every width, contexts up to
//! 32k. The comparisons need a GPU: they are `#[ignore]`d here and run by `deploy/gpu-check.sh`
//! (`--include-ignored`); what runs everywhere is that opening a device without one fails cleanly.
#![cfg(feature = "cuda-kernels")]

use pmkvq::gpu::{Gpu, GpuError, LayerSegments};
use pmkvq::kvcache::attention::decode_reference;
use pmkvq::kvcache::quant::{Bits, OffsetMode, PackedRows, ShiftMode};
use pmkvq::kvcache::KvGeometry;

fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0;
            if i % 61 == 7 {
                u * 20.0
            } else {
                u
            }
        })
        .collect()
}

fn cpu_rows(x: &[f32], bits: Bits, g: usize, kvh: usize, d: usize) -> PackedRows {
    let mut r = PackedRows::new(bits, g, kvh, d, OffsetMode::Stored);
    for t in x.chunks_exact(kvh * d) {
        r.push_token(t);
    }
    r
}

fn gpu() -> Gpu {
    Gpu::open(0).unwrap_or_else(|e| panic!("a CUDA GPU is needed for this test: {e}"))
}

#[test]
fn opening_a_device_never_panics() {
    match Gpu::open(0) {
        Ok(g) => assert!(g.arch().starts_with("sm_")),
        Err(GpuError::NoDriver | GpuError::NoNvrtc | GpuError::Driver(_)) => {}
        Err(e) => panic!("unexpected: {e}"),
    }
}

#[test]
#[ignore = "needs a CUDA GPU: deploy/gpu-check.sh runs it"]
fn quantize_and_shrink_equal_the_cpu_bit_for_bit() {
    let gpu = gpu();
    for (kvh, d, g, t) in [
        (3usize, 64usize, 64usize, 257usize),
        (2, 128, 32, 130),
        (8, 128, 128, 33),
    ] {
        let x = values(t * kvh * d, (kvh * d + g) as u64);
        for bits in [Bits::B16, Bits::B8, Bits::B4, Bits::B2] {
            let want = cpu_rows(&x, bits, g, kvh, d);
            let got = gpu.quantize(&x, kvh, d, g, bits).unwrap();
            assert_eq!(got.data, want.data, "codes, {bits:?} g {g}");
            assert_eq!(got.scale, want.scale, "scales, {bits:?} g {g}");
            assert_eq!(got.offset, want.offset, "offsets, {bits:?} g {g}");
        }
        for mode in [ShiftMode::Equivalent, ShiftMode::Direct, ShiftMode::Modified] {
            let mut cpu = cpu_rows(&x, Bits::B16, g, kvh, d);
            let mut dev = cpu.clone();
            while cpu.bits > Bits::B2 {
                dev = gpu.shrink(&dev, mode).unwrap();
                cpu.shrink(mode);
                assert_eq!(dev.bits, cpu.bits);
                assert_eq!(dev.data, cpu.data, "{mode:?} to {:?}", cpu.bits);
                assert_eq!(dev.scale, cpu.scale);
                assert_eq!(dev.offset, cpu.offset);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: deploy/gpu-check.sh runs it"]
fn decode_attention_matches_the_cpu_at_every_width_up_to_32k() {
    let gpu = gpu();
    for (qh, kvh, d) in [(9usize, 3usize, 64usize), (32, 8, 128)] {
        let g = d;
        let geom = KvGeometry {
            layers: 1,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
        };
        let kv_dim = kvh * d;
        for ctx in [1usize, 2, 129, 1000, 32768] {
            for bits in [Bits::B16, Bits::B8, Bits::B4, Bits::B2] {
                if ctx == 32768 && qh == 32 && bits != Bits::B2 {
                    continue; // the large geometry at 32k once is enough
                }
                let seed = (ctx * 7 + bits.count() as usize + qh) as u64;
                let (kx, vx) = (values(ctx * kv_dim, seed), values(ctx * kv_dim, seed + 1));
                let sink = ctx.min(1);
                let window = (ctx - sink) % 128;
                let body = ctx - sink - window;
                let seg = |x: &[f32], lo: usize, hi: usize, b: Bits| {
                    let mut r = cpu_rows(&x[lo * kv_dim..hi * kv_dim], Bits::B16, g, kvh, d);
                    r.shrink_to(b, ShiftMode::Equivalent);
                    r
                };
                let ks = [
                    seg(&kx, 0, sink, Bits::B16),
                    seg(&kx, sink, sink + body, bits),
                    seg(&kx, sink + body, ctx, Bits::B16),
                ];
                let vs = [
                    seg(&vx, 0, sink, Bits::B16),
                    seg(&vx, sink, sink + body, bits),
                    seg(&vx, sink + body, ctx, Bits::B16),
                ];
                let q = values(qh * d, seed + 2);
                let (kc, vc) = (values(kv_dim, seed + 3), values(kv_dim, seed + 4));
                let want = decode_reference(
                    geom,
                    [&ks[0], &ks[1], &ks[2]],
                    [&vs[0], &vs[1], &vs[2]],
                    &q,
                    Some((&kc, &vc)),
                );
                let layer = LayerSegments {
                    k: [&ks[0], &ks[1], &ks[2]],
                    v: [&vs[0], &vs[1], &vs[2]],
                };
                for chunk in [1 << 20, 256] {
                    let got = gpu.attention_decode(geom, &layer, &q, Some((&kc, &vc)), chunk).unwrap();
                    for h in 0..qh {
                        let w = &want[h * d..(h + 1) * d];
                        let mx = w.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
                        let err = got[h * d..(h + 1) * d]
                            .iter()
                            .zip(w)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0.0f32, f32::max);
                        assert!(
                            err / mx <= 1e-3,
                            "heads {qh}/{kvh} d {d} ctx {ctx} {bits:?} chunk {chunk}: rel err {}",
                            err / mx
                        );
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU: deploy/gpu-check.sh runs it"]
fn device_memory_sampler_reads_cumemgetinfo() {
    use pmkvq::memory::DeviceMemory;
    let gpu = std::sync::Arc::new(gpu());
    let (free, total) = gpu.mem_info().unwrap();
    assert!(total > 0 && free <= total);
    let mut s = pmkvq::gpu::CudaDeviceMemory { gpu };
    let d = s.sample().expect("a sample");
    assert_eq!(d.total, total as u64);
}
