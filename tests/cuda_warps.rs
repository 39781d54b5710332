//! forward.cu's warp and block kernels run on the host: the decode/prefill attention over a sequence's stored
//! segments with its split-K combine, RMSNorm with its 8-bit blocks, the 8-bit activation quantizer and the
//! block-weight matmul. The driver (tests/kernels_host) runs each block's threads as fibers, so shuffles and
//! barriers behave as on a GPU (a lane that diverges from its warp's shuffle aborts the driver). They are checked
//! against the CPU's specification: bit for bit where the GPU keeps the CPU's order of operations (the 8-bit codes,
//! RMSNorm), within f32 rounding where it sums in another order (attention, matmul). What only a GPU can show —
//! speed, the launches themselves — is `deploy/gpu-check.sh`'s.

mod kernels_host;
use half::f16;
use kernels_host::{hex, noise, run, words};
use pmkvq::cpu::{BlockFormat, Q8Row, SCALAR};
use pmkvq::kvcache::quant::{Bits, OffsetMode, PackedRows};
use pmkvq::kvcache::rotate::Rotation;
use pmkvq::kvcache::{KvGeometry, ROTATION_SEED};

/// Attention heads: query heads, KV heads, head dim.
#[derive(Clone, Copy)]
struct Geo {
    qh: usize,
    kvh: usize,
    d: usize,
}

impl Geo {
    fn kvd(&self) -> usize {
        self.kvh * self.d
    }
    /// The rotation a one-layer cache of these heads applies (layer 0's signs).
    fn rotation(&self) -> Rotation {
        let g = KvGeometry {
            layers: 1,
            q_heads: self.qh,
            kv_heads: self.kvh,
            head_dim: self.d,
        };
        Rotation::new(g, ROTATION_SEED).unwrap()
    }
}

/// Key scales λ (kv_dim of them, around 0.6–0.8) and their inverses.
fn key_scales(kvd: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let scales: Vec<f32> = noise(kvd, seed).iter().map(|x| 0.6 + x.abs() * 0.2).collect();
    let inv = scales.iter().map(|&x| 1.0 / x).collect();
    (scales, inv)
}

/// One stored segment: raw f16 rows (the fp16 cache's pages) or packed rows at a width.
enum Seg {
    Raw { k: Vec<f32>, v: Vec<f32>, kvd: usize },
    Packed { k: PackedRows, v: PackedRows },
}

impl Seg {
    fn new(geo: Geo, bits: u32, len: usize, g: usize, seed: u64) -> Seg {
        let kvd = geo.kvd();
        let (k, v) = (noise(len * kvd, seed), noise(len * kvd, seed + 1));
        match Bits::from_count(bits) {
            None => {
                let r = |x: Vec<f32>| x.iter().map(|&a| f16::from_f32(a).to_f32()).collect();
                Seg::Raw { k: r(k), v: r(v), kvd }
            }
            Some(b) => {
                let pack = |x: &[f32]| {
                    let mut rows = PackedRows::new(b, g, geo.kvh, geo.d, OffsetMode::Stored);
                    for t in x.chunks(kvd) {
                        rows.push_token(t);
                    }
                    rows
                };
                Seg::Packed {
                    k: pack(&k),
                    v: pack(&v),
                }
            }
        }
    }
    fn len(&self) -> usize {
        match self {
            Seg::Raw { k, kvd, .. } => k.len() / kvd,
            Seg::Packed { k, .. } => k.scale.len() * k.group / (k.kv_heads * k.head_dim),
        }
    }
    /// The segment as the driver reads it: bits len g, then K and V.
    fn input(&self, g: usize) -> String {
        match self {
            Seg::Raw { k, v, .. } => {
                let h = |x: &[f32]| words(&x.iter().map(|&a| f16::from_f32(a).to_bits()).collect::<Vec<_>>());
                format!("0 {} {g}\n{}{}", self.len(), h(k), h(v))
            }
            Seg::Packed { k, v } => {
                let mut s = format!("{} {} {g}\n", k.bits.count(), self.len());
                for r in [k, v] {
                    s += &words(&r.data);
                    s += &words(&r.scale.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                    s += &words(&r.offset.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
                s
            }
        }
    }
    /// Token t's K and V as the cache holds them (dequantized).
    fn token(&self, t: usize) -> (Vec<f32>, Vec<f32>) {
        match self {
            Seg::Raw { k, v, kvd } => (k[t * kvd..(t + 1) * kvd].to_vec(), v[t * kvd..(t + 1) * kvd].to_vec()),
            Seg::Packed { k, v } => {
                let n = k.kv_heads * k.head_dim;
                let (mut a, mut b) = (vec![0.0; n], vec![0.0; n]);
                k.dequantize_token(t, &mut a);
                v.dequantize_token(t, &mut b);
                (a, b)
            }
        }
    }
}

struct Sequence {
    g: usize,
    segs: Vec<Seg>,
    /// Key reparameterization: queries × λ, new keys × 1/λ.
    scales: Option<(Vec<f32>, Vec<f32>)>,
    /// The layer's rotation signs when the sequence's cache rotates (the combine then undoes the rotation).
    signs: Option<Vec<f32>>,
}

/// The attention step of `rows` (sequence, fresh tokens up to this one, first fresh row of its call) over
/// `seqs`, as the spec computes it in f64: every stored token then the call's own tokens up to the row, softmax of
/// q·k·scale, Σ p·v.
#[allow(clippy::type_complexity)]
fn attention_spec(
    geo: Geo,
    seqs: &[Sequence],
    rows: &[(usize, usize, usize)],
    q: &[f32],
    kn: &[f32],
    vn: &[f32],
    sm: f32,
) -> Vec<f32> {
    let Geo { qh, kvh: kv_heads, d } = geo;
    let kvd = geo.kvd();
    let mut out = vec![0.0f32; rows.len() * qh * d];
    for (r, &(si, fresh, fresh0)) in rows.iter().enumerate() {
        let s = &seqs[si];
        let mut kv: Vec<(Vec<f32>, Vec<f32>)> = s.segs.iter().flat_map(|g| (0..g.len()).map(|t| g.token(t))).collect();
        for i in 0..fresh {
            let row = fresh0 + i;
            let mut k = kn[row * kvd..(row + 1) * kvd].to_vec();
            if let Some((_, inv)) = &s.scales {
                k.iter_mut().zip(inv).for_each(|(a, b)| *a *= b);
            }
            kv.push((k, vn[row * kvd..(row + 1) * kvd].to_vec()));
        }
        for h in 0..qh {
            let kvh = h / (qh / kv_heads);
            let qv: Vec<f32> = (0..d)
                .map(|j| {
                    let x = q[(r * qh + h) * d + j];
                    s.scales.as_ref().map_or(x, |(l, _)| x * l[kvh * d + j])
                })
                .collect();
            let scores: Vec<f64> = kv
                .iter()
                .map(|(k, _)| (0..d).map(|j| qv[j] as f64 * k[kvh * d + j] as f64).sum::<f64>() * sm as f64)
                .collect();
            let mx = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = scores.iter().map(|x| (x - mx).exp()).collect();
            let l: f64 = p.iter().sum();
            for j in 0..d {
                let a: f64 = kv.iter().zip(&p).map(|((_, v), w)| w * v[kvh * d + j] as f64).sum();
                out[(r * qh + h) * d + j] = (a / l) as f32;
            }
        }
    }
    out
}

/// pk_attention and pk_attn_combine as a step launches them, on a batch that mixes what the device store holds:
/// a PM-KVQ layout (16-bit sink, bodies at 8, 2 — empty — and 4 bits, a 16-bit window) with one decode row; fp16
/// pages with key scales and a 3-token prefill chunk (each row sees the chunk up to itself); a new sequence (no
/// segments) prefilling 2 tokens; and forty 2-bit pages of 8 tokens (the split's first segment found by bisection).
/// Several split plans, with empty splits past the data, give the spec's output.
#[test]
fn attention_and_its_split_combine_give_the_specs_output_over_every_segment_kind() {
    // the default model's groups of 3; groups of 5 (two warps per group: 4 + 1 heads); no grouping, 128-dim heads
    for geo in [
        Geo { qh: 9, kvh: 3, d: 64 },
        Geo { qh: 10, kvh: 2, d: 64 },
        Geo { qh: 2, kvh: 2, d: 128 },
    ] {
        attention_case(geo, false);
    }
}

/// The combine as the step launches it — the inverse rotation of rotated sequences' heads and the output
/// projection's 8-bit blocks in the same launch — equals the three launches it replaces (plain combine,
/// pk_rotate's inverse, pk_quant8) bit for bit, on a batch where two of four sequences rotate; the rotated rows
/// are the spec's output turned back by the host rotation's inverse, the others the spec's.
#[test]
fn the_fused_combine_equals_combine_then_inverse_rotation_then_8_bit_blocks() {
    attention_case(Geo { qh: 9, kvh: 3, d: 64 }, true);
    attention_case(Geo { qh: 4, kvh: 2, d: 128 }, true);
}

/// One batch over every segment kind (see the tests above); `fused`: two sequences rotate and the combine writes
/// 8-bit blocks.
fn attention_case(geo: Geo, fused: bool) {
    let Geo { qh, kvh, d } = geo;
    let kvd = geo.kvd();
    let (scales, inv) = key_scales(kvd, 40);
    let rot = geo.rotation();
    let signs = rot.signs(0).unwrap().to_vec();
    let seqs = vec![
        Sequence {
            g: 32,
            segs: vec![
                Seg::new(geo, 16, 4, 32, 1),
                Seg::new(geo, 8, 70, 32, 3),
                Seg::new(geo, 2, 0, 32, 5),
                Seg::new(geo, 4, 33, 32, 7),
                Seg::new(geo, 16, 19, 32, 9),
            ],
            scales: None,
            signs: fused.then(|| signs.clone()),
        },
        Sequence {
            g: 64,
            segs: vec![
                Seg::new(geo, 0, 100, 64, 11),
                Seg::new(geo, 0, 100, 64, 13),
                Seg::new(geo, 0, 40, 64, 15),
            ],
            scales: Some((scales, inv)),
            signs: None,
        },
        Sequence {
            g: 32,
            segs: vec![],
            scales: None,
            signs: None,
        },
        Sequence {
            g: 64,
            segs: (0..40).map(|i| Seg::new(geo, 2, 8, 64, 100 + 2 * i)).collect(),
            scales: None,
            signs: fused.then(|| signs.clone()),
        },
    ];
    // (sequence, fresh tokens up to this row, the call's first row)
    let rows = [
        (0, 1, 0),
        (1, 1, 1),
        (1, 2, 1),
        (1, 3, 1),
        (2, 1, 4),
        (2, 2, 4),
        (3, 1, 6),
    ];
    let t = rows.len();
    let q: Vec<f32> = noise(t * qh * d, 50).iter().map(|x| x * 0.1).collect();
    let (kn, vn) = (noise(t * kvd, 51), noise(t * kvd, 52));
    let sm = 1.0 / (d as f32).sqrt();
    let mut want = attention_spec(geo, &seqs, &rows, &q, &kn, &vn, sm);
    // a rotated sequence's output leaves the combine turned back (its q, k, v were rotated before attention)
    for (r, row) in rows.iter().enumerate() {
        if seqs[row.0].signs.is_some() {
            rot.inverse(0, &mut want[r * qh * d..(r + 1) * qh * d]);
        }
    }
    let max_total = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| s.segs.iter().map(Seg::len).sum::<usize>() + rows.iter().filter(|r| r.0 == i).count())
        .max()
        .unwrap();
    let vmax = want.iter().fold(0.0f32, |m, x| m.max(x.abs()));
    // (chunk, splits, query heads per warp): several split plans with the grouped warps, and a warp per head (the
    // launch plan benchmarks compare against)
    let plans = [(64, 8, 4), (96, 8, 4), (max_total.div_ceil(32) * 32, 1, 4), (64, 8, 1)];
    for &(chunk, splits, gqa) in if fused { &plans[..1] } else { &plans[..] } {
        assert!(chunk * splits >= max_total);
        let nsegs: usize = seqs.iter().map(|s| s.segs.len()).sum();
        let mut input = format!(
            "A {qh} {kvh} {d} {chunk} {splits} {t} {} {nsegs} {:08x} {} {:08x} {} {gqa}\n",
            seqs.len(),
            sm.to_bits(),
            rot.block(),
            rot.scale().to_bits(),
            fused as i32
        );
        for s in &seqs {
            for g in &s.segs {
                input += &g.input(s.g);
            }
        }
        let mut seg_start = 0;
        for s in &seqs {
            let stored: usize = s.segs.iter().map(Seg::len).sum();
            input += &format!(
                "{seg_start} {} {stored} {} {} {}\n",
                s.segs.len(),
                s.g,
                s.scales.is_some() as i32,
                s.signs.is_some() as i32
            );
            if let Some((l, inv)) = &s.scales {
                input += &hex(l);
                input += &hex(inv);
            }
            if let Some(x) = &s.signs {
                input += &hex(x);
            }
            seg_start += s.segs.len();
        }
        for field in 0..3 {
            input += &words(&rows.iter().map(|r| [r.0, r.1, r.2][field] as u32).collect::<Vec<_>>());
        }
        input += &hex(&q);
        input += &hex(&kn);
        input += &hex(&vn);
        let lines = run(&input);
        // the fused launch's output (and 8-bit blocks), then the separate launches'
        let n = if fused { 4 } else { 1 };
        assert_eq!(lines.len(), 2 * n);
        for i in 0..n {
            let what = ["output", "8-bit codes", "block scales", "block sums"][i];
            let (a, b) = (&lines[i], &lines[n + i]);
            assert_eq!(a.len(), b.len(), "{what}");
            let diff: Vec<usize> = (0..a.len()).filter(|&k| a[k] != b[k]).collect();
            assert!(
                diff.is_empty(),
                "{what}: the fused combine differs from the three launches in {} of {} values (first at {})",
                diff.len(),
                a.len(),
                diff[0]
            );
        }
        if fused {
            let codes = lines[1].iter().filter(|&&c| c != 0).count();
            assert!(codes > lines[1].len() / 2, "8-bit codes written: {codes}");
        }
        let got: Vec<f32> = lines[0].iter().map(|&w| f32::from_bits(w)).collect();
        assert_eq!(got.len(), want.len());
        let (mut worst, mut at) = (0.0f32, 0);
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            let e = if a.is_nan() { f32::INFINITY } else { (a - b).abs() };
            if e > worst {
                worst = e;
                at = i;
            }
        }
        // f32 scores and sums in the kernel's order against f64: a misplaced segment, token or split is off by
        // the size of the values themselves
        assert!(
            worst <= 2e-6 * vmax.max(1.0),
            "{qh}/{kvh} heads of {d}, {gqa} per warp, chunk {chunk} × {splits} splits: row {}, head {}, dim {}: {} vs {} (|error| {worst:e}, values up to {vmax})",
            at / (qh * d),
            at / d % qh,
            at % d,
            got[at],
            want[at]
        );
    }
}

/// pk_qkv_post — RoPE, the key scales and rotation of rotated sequences, and the store of each row's K and V, in one
/// launch per layer — equals the three launches it replaces (pk_rope, pk_rotate, pk_kv_store; each checked against
/// the CPU in tests/cuda_host.rs or here) bit for bit: a batch of a rotated sequence with key scales, a plain one
/// with key scales (its keys scaled by the store) and a plain one, slots at every width and groups of 32 and 64,
/// RoPE in both layouts.
#[test]
fn the_fused_rope_rotation_and_store_equal_the_three_launches_they_replace() {
    for (geo, neox) in [
        (Geo { qh: 9, kvh: 3, d: 64 }, true),
        (Geo { qh: 4, kvh: 2, d: 128 }, false),
    ] {
        let Geo { qh, kvh, d } = geo;
        let (kvd, half) = (geo.kvd(), d / 2);
        let rot = geo.rotation();
        let (scales, inv) = key_scales(kvd, 30);
        // (sequence, bits, group); sequence 0 rotates (its keys scaled by the rotation: no 1/λ in its slots, as the
        // device store hands them out), 1 has key scales, 2 has neither
        let toks = [(0, 16, 32), (1, 8, 64), (1, 0, 64), (2, 4, 32), (0, 2, 32), (2, 2, 64)];
        let t = toks.len();
        let mut input = format!(
            "P {qh} {kvh} {d} {t} {} {} {:08x} 32 3\n",
            neox as i32,
            rot.block(),
            rot.scale().to_bits()
        );
        input += "1 1\n";
        input += &hex(rot.signs(0).unwrap());
        input += &hex(&scales);
        input += &hex(&inv);
        input += "0 1\n";
        input += &hex(&scales);
        input += &hex(&inv);
        input += "0 0\n";
        input += &words(&toks.iter().map(|x| x.0 as u32).collect::<Vec<_>>());
        let angles: Vec<f32> = noise(t * half, 31).iter().map(|a| a * 2.0).collect();
        input += &hex(&angles.iter().map(|a| a.cos()).collect::<Vec<_>>());
        input += &hex(&angles.iter().map(|a| a.sin()).collect::<Vec<_>>());
        for &(seq, bits, g) in &toks {
            input += &format!("{bits} {g} {}\n", (seq == 1) as i32);
            if seq == 1 {
                input += &hex(&inv);
            }
        }
        let (q, k, v) = (noise(t * qh * d, 32), noise(t * kvd, 33), noise(t * kvd, 34));
        input += &hex(&q);
        input += &hex(&k);
        input += &hex(&v);
        let lines = run(&input);
        let n = 3 + 6 * t;
        assert_eq!(lines.len(), 2 * n);
        for i in 0..n {
            let what = match i {
                0..=2 => ["q", "k", "v"][i].to_string(),
                _ => {
                    let j = i - 3;
                    format!(
                        "token {} {} {}",
                        j / 6,
                        ["K", "V"][j / 3 % 2],
                        ["codes", "scales", "offsets"][j % 3]
                    )
                }
            };
            let diff = lines[i].iter().zip(&lines[n + i]).filter(|(a, b)| a != b).count();
            assert!(
                diff == 0 && lines[i].len() == lines[n + i].len(),
                "{qh}/{kvh} heads of {d}: {what}: the fused launch differs from the three in {diff} of {} values",
                lines[i].len()
            );
        }
        // RoPE and the rotation did something, and every slot was written
        let bits = |x: &[f32]| x.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
        assert_ne!(lines[0], bits(&q));
        assert_ne!(lines[2], bits(&v), "the rotated sequence's values");
        for i in 0..2 * t {
            assert!(
                lines[3 + 3 * i].iter().any(|&c| c != 0),
                "slot {} {} written",
                i / 2,
                ["K", "V"][i % 2]
            );
        }
    }
}

/// pk_norm: the normalized rows equal the CPU's RMSNorm bit for bit (sum of squares in f64, then
/// x·(1/√(ms+ε))·w), and its 8-bit blocks equal `quantize_q8` of them.
#[test]
fn rms_norm_and_its_8_bit_blocks_equal_the_cpus() {
    let (rows, dim, eps) = (3, 576, 1e-5f32);
    let x: Vec<f32> = noise(rows * dim, 60).iter().map(|a| a * 7.0).collect();
    let w: Vec<f32> = noise(dim, 61).iter().map(|a| 0.5 + a * 0.1).collect();
    let mut input = format!("N {rows} {dim} {:08x}\n", eps.to_bits());
    input += &hex(&x);
    input += &hex(&w);
    let lines = run(&input);
    assert_eq!(lines.len(), 4);
    let mut out = Vec::new();
    for row in x.chunks(dim) {
        let ms = (row.iter().map(|&v| (v * v) as f64).sum::<f64>() / dim as f64) as f32;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(row.iter().zip(&w).map(|(v, g)| v * inv * g));
    }
    let bits = |v: &[f32]| v.iter().map(|a| a.to_bits()).collect::<Vec<_>>();
    assert_eq!(lines[0], bits(&out), "normalized rows");
    let mut q8 = Q8Row::default();
    (SCALAR.quantize_q8)(&out, &mut q8);
    assert_eq!(
        lines[1],
        q8.qs.iter().map(|&c| c as u8 as u32).collect::<Vec<_>>(),
        "8-bit codes"
    );
    assert_eq!(lines[2], bits(&q8.d), "block scales");
    assert_eq!(lines[3], bits(&q8.s), "block sums");
}

/// Random weight rows of `fmt` with sane f16 block scales (and Q4_1 minimums).
fn weights(fmt: BlockFormat, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    let bb = match fmt {
        BlockFormat::Q4_0 => 18,
        BlockFormat::Q4_1 => 20,
        _ => 34,
    };
    let r = noise(rows * cols / 32 * bb, seed);
    let mut w: Vec<u8> = r.iter().map(|a| (a.to_bits() >> 7) as u8).collect();
    for (i, blk) in w.chunks_mut(bb).enumerate() {
        blk[..2].copy_from_slice(&f16::from_f32(0.01 + (i % 7) as f32 * 0.005).to_le_bytes());
        if fmt == BlockFormat::Q4_1 {
            blk[2..4].copy_from_slice(&f16::from_f32(-0.05 + (i % 5) as f32 * 0.02).to_le_bytes());
        }
    }
    w
}

/// pk_quant8 then pk_matmul_q as the forward pass launches them: the activations' 8-bit blocks equal the CPU's
/// `quantize_q8` bit for bit, and every output equals the CPU's block dot product (+ bias, + what the residual
/// held) up to f32 summation order, over Q4_0, Q4_1 and Q8_0, a partial warp of rows, a partial tile of tokens and
/// outputs split into parts (q|k|v, gate|up).
#[test]
fn block_matmuls_over_8_bit_activations_equal_the_cpus_dot_products() {
    let (rows, cols, t) = (37, 576, 10);
    let x: Vec<f32> = noise(t * cols, 70);
    // (format, driver code, output parts' row starts, accumulate, bias)
    let cases = [
        (BlockFormat::Q4_0, 2, vec![0, 37], false, true),
        (BlockFormat::Q4_1, 3, vec![0, 10, 20, 37], true, false),
        (BlockFormat::Q8_0, 4, vec![0, 20, 37], false, false),
    ];
    let mut q8 = vec![Q8Row::default(); t];
    for (i, row) in x.chunks(cols).enumerate() {
        (SCALAR.quantize_q8)(row, &mut q8[i]);
    }
    for (ci, (fmt, code, start, accumulate, has_bias)) in cases.iter().enumerate() {
        let w = weights(*fmt, rows, cols, 80 + ci as u64);
        let bias = noise(rows, 90);
        let parts = start.len() - 1;
        let init: Vec<Vec<f32>> = (0..parts)
            .map(|p| noise(t * (start[p + 1] - start[p]), 95 + p as u64))
            .collect();
        let mut input = format!(
            "M {code} {rows} {cols} {t} {parts} {} {}\n",
            *accumulate as i32, *has_bias as i32
        );
        input += &words(&start.iter().map(|&s| s as u32).collect::<Vec<_>>());
        input += &words(&w);
        input += &hex(&x);
        if *has_bias {
            input += &hex(&bias);
        }
        if *accumulate {
            for part in &init {
                input += &hex(part);
            }
        }
        let lines = run(&input);
        assert_eq!(lines.len(), 3 + parts);
        let qs: Vec<u32> = q8.iter().flat_map(|r| r.qs.iter().map(|&c| c as u8 as u32)).collect();
        assert_eq!(lines[0], qs, "{fmt:?}: 8-bit codes of the activations");
        let bits = |f: fn(&Q8Row) -> &Vec<f32>| {
            q8.iter()
                .flat_map(|r| f(r).iter().map(|a| a.to_bits()))
                .collect::<Vec<_>>()
        };
        assert_eq!(lines[1], bits(|r| &r.d), "{fmt:?}: block scales");
        assert_eq!(lines[2], bits(|r| &r.s), "{fmt:?}: block sums");
        let row_bytes = w.len() / rows;
        // Σ|w|·|x| over a row: the f32 sums of block products (in the CPU's order or the warp's) are within a few
        // ulps of it; a misplaced block or quarter is off by a block product's size
        let mut wr = vec![0.0f32; cols];
        let magnitude = |r: usize, ti: usize, wr: &mut Vec<f32>| {
            pmkvq::cpu::dequantize_row(*fmt, &w[r * row_bytes..(r + 1) * row_bytes], wr);
            let q = &q8[ti];
            wr.iter()
                .enumerate()
                .map(|(j, a)| a.abs() * (q.qs[j] as f32 * q.d[j / 32]).abs())
                .sum::<f32>()
        };
        for p in 0..parts {
            let n = start[p + 1] - start[p];
            for ti in 0..t {
                for i in 0..n {
                    let r = start[p] + i;
                    let mut want = fmt.dot(&SCALAR, &w[r * row_bytes..(r + 1) * row_bytes], &q8[ti]);
                    if *has_bias {
                        want += bias[r];
                    }
                    if *accumulate {
                        want += init[p][ti * n + i];
                    }
                    let got = f32::from_bits(lines[3 + p][ti * n + i]);
                    let tol = 4e-6 * (magnitude(r, ti, &mut wr) + want.abs()) + 1e-6;
                    assert!(
                        (got - want).abs() <= tol,
                        "{fmt:?}: token {ti}, row {r} (part {p}): {got} vs {want} (tolerance {tol:e})"
                    );
                }
            }
        }
    }
}

/// pk_matmul_qa — a decode step's matmul that makes its own 8-bit activation blocks — equals the two launches it
/// replaces bit for bit: RMSNorm of the residual rows (pk_norm, its sum of squares in the same order) or SwiGLU of
/// gate and up (pk_swiglu), then pk_matmul_q; every block format, 1 to 8 tokens, bias, and the residual
/// accumulation of the down projection.
#[test]
fn matmuls_that_make_their_own_8_bit_blocks_equal_norm_or_swiglu_then_matmul() {
    // (mode, format code, format, rows, cols, tokens, bias, accumulate)
    let cases = [
        (0, 3, BlockFormat::Q4_1, 37, 576, 1, false, false),
        (0, 2, BlockFormat::Q4_0, 40, 576, 8, true, false),
        (1, 4, BlockFormat::Q8_0, 37, 1536, 3, false, true),
        (1, 3, BlockFormat::Q4_1, 12, 1536, 1, false, true),
    ];
    for (ci, &(mode, code, fmt, rows, cols, t, has_bias, accumulate)) in cases.iter().enumerate() {
        let w = weights(fmt, rows, cols, 200 + ci as u64);
        let x: Vec<f32> = noise(t * cols, 210 + ci as u64).iter().map(|a| a * 5.0).collect();
        let aux: Vec<f32> = if mode == 0 {
            noise(cols, 220).iter().map(|a| 0.5 + a * 0.1).collect()
        } else {
            noise(t * cols, 221)
        };
        let mut input = format!(
            "G {mode} {code} {rows} {cols} {t} {} {} {:08x}\n",
            has_bias as i32,
            accumulate as i32,
            1e-5f32.to_bits()
        );
        input += &words(&w);
        input += &hex(&x);
        input += &hex(&aux);
        if has_bias {
            input += &hex(&noise(rows, 230));
        }
        if accumulate {
            input += &hex(&noise(t * rows, 231));
        }
        let lines = run(&input);
        assert_eq!(lines.len(), 2);
        let what = format!("{} into {fmt:?}, {t} token(s)", ["RMSNorm", "SwiGLU"][mode]);
        assert_eq!(lines[0].len(), t * rows, "{what}");
        let diff = lines[0].iter().zip(&lines[1]).filter(|(a, b)| a != b).count();
        assert_eq!(
            diff,
            0,
            "{what}: the fused launch differs from the two in {diff} of {} outputs",
            t * rows
        );
        assert!(
            lines[0].iter().all(|&v| f32::from_bits(v).is_finite()),
            "{what}: every output written"
        );
    }
}
