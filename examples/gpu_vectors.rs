//! Reference vectors for the CUDA kernels, computed by the CPU specification (`kvcache::quant`): quantize + pack
//! at every width, ERS/direct/modified shrink chains, and decode attention over mixed-precision layers (contexts
//! up to 32k). `kernels/harness/check.cu` runs the kernels on them (`deploy/gpu-check.sh`).
//!
//! `cargo run --release --example gpu_vectors -- DIR`

use half::f16;
use pmkvq::kvcache::attention::decode_reference;
use pmkvq::kvcache::quant::{Bits, OffsetMode, PackedRows, ShiftMode};
use std::io::Write;

struct Out(Vec<u8>);

impl Out {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u32(v.len() as u32);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn bytes(&mut self, v: &[u8]) {
        self.u32(v.len() as u32);
        self.0.extend_from_slice(v);
    }
    fn halves(&mut self, v: &[f16]) {
        self.u32(v.len() as u32);
        for x in v {
            self.0.extend_from_slice(&x.to_bits().to_le_bytes());
        }
    }
    fn rows(&mut self, r: &PackedRows) {
        self.u32(r.bits.count());
        self.u32(r.len() as u32);
        self.bytes(&r.data);
        self.halves(&r.scale);
        self.halves(&r.offset);
    }
}

/// Deterministic values with occasional outliers (keys have a few large channels).
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

fn rows_of(x: &[f32], bits: Bits, g: usize, kv_heads: usize, d: usize) -> PackedRows {
    let mut r = PackedRows::new(bits, g, kv_heads, d, OffsetMode::Stored);
    for t in x.chunks_exact(kv_heads * d) {
        r.push_token(t);
    }
    r
}

fn main() -> std::io::Result<()> {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "gpu-vectors".into()));
    std::fs::create_dir_all(&dir)?;

    // 1. quantize + pack, every width, two geometries.
    let mut o = Out(Vec::new());
    let geoms = [(3usize, 64usize, 64usize, 257usize), (2, 128, 32, 130)];
    o.u32((geoms.len() * 4) as u32);
    for (gi, &(kvh, d, g, t)) in geoms.iter().enumerate() {
        let x = values(t * kvh * d, 11 + gi as u64);
        for bits in [Bits::B16, Bits::B8, Bits::B4, Bits::B2] {
            let r = rows_of(&x, bits, g, kvh, d);
            for v in [kvh, d, g, t] {
                o.u32(v as u32);
            }
            o.f32s(&x);
            o.rows(&r);
        }
    }
    std::fs::File::create(dir.join("quant.bin"))?.write_all(&o.0)?;

    // 2. shrink chains 16 -> 8 -> 4 -> 2 under each mode.
    let mut o = Out(Vec::new());
    let (kvh, d, g, t) = (3, 64, 64, 300);
    let x = values(t * kvh * d, 5);
    o.u32(9);
    for (mi, mode) in [ShiftMode::Equivalent, ShiftMode::Direct, ShiftMode::Modified]
        .into_iter()
        .enumerate()
    {
        let mut r = rows_of(&x, Bits::B16, g, kvh, d);
        for _ in 0..3 {
            o.u32(mi as u32);
            o.u32(g as u32);
            o.rows(&r);
            r.shrink(mode);
            o.rows(&r);
        }
    }
    std::fs::File::create(dir.join("shrink.bin"))?.write_all(&o.0)?;

    // 3. decode attention over (sink 16 | body at b | window 16 | current token f32), GQA 9 -> 3 heads.
    let (qh, kvh, d, g) = (9usize, 3usize, 64usize, 64usize);
    let kv_dim = kvh * d;
    let mut cases: Vec<(usize, Bits)> = Vec::new();
    for ctx in [1usize, 2, 129, 300, 4096] {
        for b in [Bits::B16, Bits::B8, Bits::B4, Bits::B2] {
            cases.push((ctx, b));
        }
    }
    cases.push((32768, Bits::B2));
    cases.push((32768, Bits::B4));
    let mut o = Out(Vec::new());
    o.u32(cases.len() as u32);
    for (ci, &(ctx, bits)) in cases.iter().enumerate() {
        let kx = values(ctx * kv_dim, 100 + ci as u64);
        let vx = values(ctx * kv_dim, 200 + ci as u64);
        let sink = ctx.min(1);
        let window = (ctx - sink) % 128;
        let body = ctx - sink - window;
        let seg = |x: &[f32], lo: usize, hi: usize, b: Bits| {
            let mut r = rows_of(&x[lo * kv_dim..hi * kv_dim], Bits::B16, g, kvh, d);
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
        let q = values(qh * d, 300 + ci as u64);
        let kc = values(kv_dim, 400 + ci as u64);
        let vc = values(kv_dim, 500 + ci as u64);
        let geom = pmkvq::kvcache::KvGeometry {
            layers: 1,
            q_heads: qh,
            kv_heads: kvh,
            head_dim: d,
        };
        let out = decode_reference(
            geom,
            [&ks[0], &ks[1], &ks[2]],
            [&vs[0], &vs[1], &vs[2]],
            &q,
            Some((&kc, &vc)),
        );
        for v in [qh, kvh, d, g, ctx, bits.count() as usize] {
            o.u32(v as u32);
        }
        o.f32s(&q);
        o.f32s(&kc);
        o.f32s(&vc);
        for s in ks.iter().chain(&vs) {
            o.rows(s);
        }
        o.f32s(&out);
    }
    std::fs::File::create(dir.join("attn.bin"))?.write_all(&o.0)?;
    println!("vectors in {}", dir.display());
    Ok(())
}
