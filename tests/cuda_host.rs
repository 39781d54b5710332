//! The CUDA kernels that work one thread per group or row — `kv_quant.cu`, `kv_shrink.cu` (every shift mode,
//! the fitted 2-bit floor included: `pmkvq_fit.h`) and `forward.cu`'s `pk_rotate` (`pmkvq_rot.h`) and
//! `pk_kv_store` — built with the host's C++ compiler (tests/kernels_host) and run on the CPU, every (block,
//! thread) in turn: they must give the host stores' codes, parameters and rotated rows bit for bit, so a device
//! cache holds what the CPU's holds. Only the CUDA words are stubbed (each `_rn` intrinsic is one IEEE operation,
//! which `-ffp-contract=off` keeps from being fused; f16 conversions go through `_Float16`, round to nearest even
//! like the GPU's `cvt.rn`). With `cuda-kernels`, the host's argument structs are checked against the kernels'
//! compiled layout. The warp and block kernels are tests/cuda_warps.rs's; what neither can check — the
//! launches on a GPU, speed — is `deploy/gpu-check.sh`'s.

use pmkvq::kvcache::quant::{Bits, OffsetMode, PackedRows, ShiftMode};
use pmkvq::kvcache::rotate::{rotation_block, Rotation};
use pmkvq::kvcache::{F32KvStore, KeyScaled, KvGeometry, KvTap, ROTATION_SEED};
use std::sync::Arc;

mod kernels_host;
use kernels_host::{hex, noise, run, words};

struct Case {
    geom: KvGeometry,
    layer: usize,
    inverse: bool,
    scales: Option<Vec<f32>>,
    lanes: usize,
}

#[test]
fn the_cuda_rotation_equals_the_host_stores_bit_for_bit() {
    let geoms = [
        // the default model's heads; 128-dim heads; a 96-dim head is three blocks of 32
        (9, 3, 64),
        (4, 2, 128),
        (6, 2, 96),
    ];
    let mut cases = Vec::new();
    for (gi, &(q_heads, kv_heads, head_dim)) in geoms.iter().enumerate() {
        let geom = KvGeometry {
            layers: 3,
            q_heads,
            kv_heads,
            head_dim,
        };
        for (ci, (inverse, scaled)) in [(false, false), (false, true), (true, false)].into_iter().enumerate() {
            cases.push(Case {
                geom,
                layer: (gi + ci) % 3,
                inverse,
                scales: scaled.then(|| {
                    noise(kv_heads * head_dim, 99 + gi as u64)
                        .iter()
                        .map(|x| 0.5 + x.abs() * 0.1)
                        .collect()
                }),
                lanes: [1, 4, 32][ci],
            });
        }
    }
    let mut input = String::new();
    let mut expected = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let g = c.geom;
        let rot = Rotation::new(g, ROTATION_SEED).unwrap();
        let block = rotation_block(g.head_dim).unwrap();
        assert_eq!(block, rot.block());
        let (q, k, v) = (
            noise(g.q_heads * g.head_dim, 3 * i as u64 + 1),
            noise(g.kv_dim(), 3 * i as u64 + 2),
            noise(g.kv_dim(), 3 * i as u64 + 3),
        );
        input += &format!(
            "R {} {} {} {} {:08x} {} {} {}\n",
            g.q_heads,
            g.kv_heads,
            g.head_dim,
            block,
            rot.scale().to_bits(),
            c.inverse as i32,
            c.scales.is_some() as i32,
            c.lanes
        );
        input += &hex(rot.signs(c.layer).unwrap());
        // the host stores: `KeyScaled` over `Rotated` (keys scaled, then rotated), through their own taps
        let (mut qe, mut ke, mut ve) = (q.clone(), k.clone(), v.clone());
        if let Some(s) = &c.scales {
            let mut per_layer = vec![vec![1.0f32; g.kv_dim()]; g.layers];
            per_layer[c.layer] = s.clone();
            let inv: Vec<f32> = s.iter().map(|&x| 1.0 / x).collect();
            input += &hex(s);
            input += &hex(&inv);
            let mut scaled = KeyScaled::new(Box::new(F32KvStore::new(g, 4)), Arc::new(per_layer), "").unwrap();
            qe = scaled.tap.query(c.layer, &g, &q).unwrap();
            ke = scaled.tap.key(c.layer, &g, &k).unwrap();
        }
        if c.inverse {
            rot.inverse(c.layer, &mut qe);
        } else {
            rot.forward(c.layer, &mut qe);
            rot.forward(c.layer, &mut ke);
            rot.forward(c.layer, &mut ve);
        }
        input += &hex(&q);
        input += &hex(&k);
        input += &hex(&v);
        input.push('\n');
        expected.push((qe, ke, ve));
    }
    let lines = run(&input);
    assert_eq!(lines.len(), 3 * cases.len(), "one q, k and v line per case");
    for (i, (c, (qe, ke, ve))) in cases.iter().zip(&expected).enumerate() {
        for (side, (got, want)) in
            ["q", "k", "v"]
                .iter()
                .zip([(&lines[3 * i], qe), (&lines[3 * i + 1], ke), (&lines[3 * i + 2], ve)])
        {
            let want: Vec<u32> = want.iter().map(|x| x.to_bits()).collect();
            let diff = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                diff,
                0,
                "case {i} ({:?}, layer {}, inverse {}, scaled {}): {side} differs in {diff} of {} values",
                (c.geom.q_heads, c.geom.kv_heads, c.geom.head_dim),
                c.layer,
                c.inverse,
                c.scales.is_some(),
                want.len()
            );
        }
        // the rotation did something (an identity would pass the comparison too)
        if !c.inverse {
            let q = noise(c.geom.q_heads * c.geom.head_dim, 3 * i as u64 + 1);
            assert!(qe.iter().zip(&q).filter(|(a, b)| a != b).count() > qe.len() / 2);
        }
    }
}

/// K/V-like rows: most channels small, a few outliers, and some groups made constant or two-valued (the
/// quantizer's and the fit's edge cases).
fn rows_of(tokens: usize, width: usize, group: usize, seed: u64) -> Vec<f32> {
    let mut x = noise(tokens * width, seed);
    for (gi, grp) in x.chunks_mut(group).enumerate() {
        match gi % 17 {
            3 => grp.iter_mut().for_each(|v| *v = 0.75),
            8 => grp
                .iter_mut()
                .enumerate()
                .for_each(|(j, v)| *v = if j % 3 == 0 { -1.5 } else { 2.25 }),
            _ => {}
        }
    }
    x
}

/// A store's packed rows as the driver prints them: codes (bytes), scales, offsets (f16 bits).
fn packed_words(rows: &PackedRows) -> [Vec<u32>; 3] {
    [
        rows.data.iter().map(|&b| b as u32).collect(),
        rows.scale.iter().map(|s| s.to_bits() as u32).collect(),
        rows.offset.iter().map(|s| s.to_bits() as u32).collect(),
    ]
}

#[test]
fn the_cuda_quantize_kernel_packs_the_host_stores_codes() {
    let (kv_heads, head_dim, tokens) = (3, 64, 40);
    let width = kv_heads * head_dim;
    let mut input = String::new();
    let mut expected = Vec::new();
    for group in [32, 64] {
        let x = rows_of(tokens, width, group, group as u64);
        for bits in [Bits::B16, Bits::B8, Bits::B4, Bits::B2] {
            let mut rows = PackedRows::new(bits, group, kv_heads, head_dim, OffsetMode::Stored);
            for t in x.chunks(width) {
                rows.push_token(t);
            }
            input += &format!("Q {} {group} {}\n", x.len() / group, bits.count());
            input += &hex(&x);
            input.push('\n');
            expected.push((group, bits, rows));
        }
    }
    let lines = run(&input);
    assert_eq!(lines.len(), 3 * expected.len());
    for (i, (group, bits, rows)) in expected.iter().enumerate() {
        let what = format!("group {group}, {} bits", bits.count());
        let [codes, scales, offsets] = packed_words(rows);
        assert_eq!(lines[3 * i], codes, "codes, {what}");
        assert_eq!(lines[3 * i + 1], scales, "scales, {what}");
        assert_eq!(lines[3 * i + 2], offsets, "offsets, {what}");
    }
}

#[test]
fn the_cuda_shrink_kernel_lowers_like_the_host_store_in_every_mode_the_fitted_floor_included() {
    let (kv_heads, head_dim, tokens) = (3, 64, 48);
    let width = kv_heads * head_dim;
    let mut input = String::new();
    let mut expected = Vec::new();
    for group in [32, 64] {
        // rotated rows, as the shipped cache stores them (Gaussian-like groups: where the fit moves the grid most)
        let mut x = rows_of(tokens, width, group, 7 + group as u64);
        let rot = Rotation::new(
            KvGeometry {
                layers: 1,
                q_heads: kv_heads,
                kv_heads,
                head_dim,
            },
            ROTATION_SEED,
        )
        .unwrap();
        if group == 64 {
            rot.forward(0, &mut x);
        }
        for mode in [
            ShiftMode::Equivalent,
            ShiftMode::Direct,
            ShiftMode::Modified,
            ShiftMode::Fitted,
        ] {
            let mut rows = PackedRows::new(Bits::B16, group, kv_heads, head_dim, OffsetMode::Stored);
            for t in x.chunks(width) {
                rows.push_token(t);
            }
            // every level, each from the host store's own previous level
            while let Some(lower) = rows.bits.halved() {
                input += &format!("S {} {group} {} {}\n", rows.scale.len(), rows.bits.count(), mode as i32);
                input += &words(&rows.data);
                input += &words(&rows.scale.iter().map(|s| s.to_bits()).collect::<Vec<_>>());
                input += &words(&rows.offset.iter().map(|s| s.to_bits()).collect::<Vec<_>>());
                let before = rows.clone();
                assert!(rows.shrink(mode));
                assert_eq!(rows.bits, lower);
                expected.push((group, mode, before.bits, rows.clone()));
            }
        }
    }
    let lines = run(&input);
    assert_eq!(lines.len(), 3 * expected.len());
    let mut fitted_moved = 0;
    for (i, (group, mode, from, rows)) in expected.iter().enumerate() {
        let what = format!("group {group}, {mode:?}, {} → {} bits", from.count(), rows.bits.count());
        let [codes, scales, offsets] = packed_words(rows);
        let diff = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
        assert_eq!(lines[3 * i].len(), codes.len(), "{what}");
        assert_eq!(diff(&lines[3 * i], &codes), 0, "codes differ, {what}");
        assert_eq!(diff(&lines[3 * i + 1], &scales), 0, "scales differ, {what}");
        assert_eq!(diff(&lines[3 * i + 2], &offsets), 0, "offsets differ, {what}");
        if *mode == ShiftMode::Fitted && rows.bits == Bits::B2 {
            // the fit did move groups off the shifted grid (else Equivalent's output would pass here too)
            let ers = &expected[i - 3 * 3].3;
            assert_eq!(expected[i - 9].1, ShiftMode::Equivalent);
            fitted_moved += rows.offset.iter().zip(&ers.offset).filter(|(a, b)| a != b).count();
        }
    }
    assert!(
        fitted_moved > 10,
        "the fitted floor moved {fitted_moved} groups' offsets"
    );
}

/// `pk_rotate` as launched: a step whose rows belong to a rotated sequence (with key scales) and to one that does
/// not rotate (its scales set too, which the kernel must leave to attention and the store): the first sequence's
/// rows come out as the host taps make them, the other's untouched; the inverse likewise.
#[test]
fn pk_rotate_turns_the_rows_of_rotated_sequences_and_leaves_the_others() {
    let g = KvGeometry {
        layers: 2,
        q_heads: 9,
        kv_heads: 3,
        head_dim: 64,
    };
    let layer = 1;
    let rot = Rotation::new(g, ROTATION_SEED).unwrap();
    let scales: Vec<f32> = noise(g.kv_dim(), 5).iter().map(|x| 0.6 + x.abs() * 0.2).collect();
    let inv: Vec<f32> = scales.iter().map(|&x| 1.0 / x).collect();
    let row_seq = [0u32, 1, 0, 0];
    let t = row_seq.len();
    let (q, k, v) = (
        noise(t * g.q_dim(), 11),
        noise(t * g.kv_dim(), 12),
        noise(t * g.kv_dim(), 13),
    );
    for inverse in [false, true] {
        let mut input = format!(
            "F {} {} {} {} {:08x} {} {t} 2\n",
            g.q_heads,
            g.kv_heads,
            g.head_dim,
            rot.block(),
            rot.scale().to_bits(),
            inverse as i32
        );
        input += "1 1\n";
        input += &hex(rot.signs(layer).unwrap());
        input += &hex(&scales);
        input += &hex(&inv);
        input += "0 1\n";
        input += &hex(&scales);
        input += &hex(&inv);
        input += &words(&row_seq);
        input += &hex(&q);
        input += &hex(&k);
        input += &hex(&v);
        let lines = run(&input);
        assert_eq!(lines.len(), 3);
        let mut per_layer = vec![vec![1.0f32; g.kv_dim()]; g.layers];
        per_layer[layer] = scales.clone();
        let mut tap = KeyScaled::new(Box::new(F32KvStore::new(g, 4)), Arc::new(per_layer), "").unwrap();
        for (row, &seq) in row_seq.iter().enumerate() {
            let (qr, kr, vr) = (
                &q[row * g.q_dim()..(row + 1) * g.q_dim()],
                &k[row * g.kv_dim()..(row + 1) * g.kv_dim()],
                &v[row * g.kv_dim()..(row + 1) * g.kv_dim()],
            );
            let (mut qe, mut ke, mut ve) = (qr.to_vec(), kr.to_vec(), vr.to_vec());
            if seq == 0 {
                if inverse {
                    rot.inverse(layer, &mut qe);
                } else {
                    qe = tap.tap.query(layer, &g, qr).unwrap();
                    ke = tap.tap.key(layer, &g, kr).unwrap();
                    rot.forward(layer, &mut qe);
                    rot.forward(layer, &mut ke);
                    rot.forward(layer, &mut ve);
                }
            }
            let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            let what = format!("row {row} (sequence {seq}, inverse {inverse})");
            assert_eq!(
                lines[0][row * g.q_dim()..(row + 1) * g.q_dim()],
                bits(&qe)[..],
                "q, {what}"
            );
            assert_eq!(
                lines[1][row * g.kv_dim()..(row + 1) * g.kv_dim()],
                bits(&ke)[..],
                "k, {what}"
            );
            assert_eq!(
                lines[2][row * g.kv_dim()..(row + 1) * g.kv_dim()],
                bits(&ve)[..],
                "v, {what}"
            );
            if seq == 0 {
                assert_ne!(qe, qr, "{what}: the rotation did something");
            }
        }
    }
}

/// `pk_kv_store` as launched for a batch whose tokens go to caches of different widths and groups, some keys
/// scaled by 1/λ (an unrotated reparameterized cache) and some not (a plain one, or a rotated one whose keys
/// `pk_rotate` already scaled): every slot holds what the host store's `push_token` writes for the same row.
#[test]
fn pk_kv_store_writes_each_slot_as_the_host_store_would() {
    let (kv_heads, head_dim) = (3, 64);
    let kv_dim = kv_heads * head_dim;
    // (bits, group, key scales): bits 0 is the fp16 cache's raw rows
    let slots: [(u32, usize, bool); 6] = [
        (16, 64, false),
        (8, 32, true),
        (4, 64, true),
        (2, 32, false),
        (0, 64, true),
        (16, 32, true),
    ];
    let n = slots.len();
    let k = rows_of(n, kv_dim, 32, 21);
    let v = rows_of(n, kv_dim, 32, 22);
    let inv: Vec<f32> = noise(kv_dim, 23).iter().map(|x| 1.0 / (0.6 + x.abs() * 0.2)).collect();
    let mut input = format!("K {n} {kv_dim} 32\n");
    for &(bits, group, scaled) in &slots {
        input += &format!("{bits} {group} {}\n", scaled as i32);
        if scaled {
            input += &hex(&inv);
        }
    }
    input += &hex(&k);
    input += &hex(&v);
    let lines = run(&input);
    assert_eq!(lines.len(), 6 * n);
    for (i, &(bits, group, scaled)) in slots.iter().enumerate() {
        for side in 0..2 {
            let mut row = if side == 0 { &k } else { &v }[i * kv_dim..(i + 1) * kv_dim].to_vec();
            if side == 0 && scaled {
                pmkvq::kvcache::reparam::scale_keys(&inv, &mut row);
            }
            let [data, scales, offsets] = match Bits::from_count(bits) {
                // the fp16 cache's rounding (F16KvStore): f16 of each value, little-endian bytes
                None => [
                    row.iter()
                        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                        .map(u32::from)
                        .collect(),
                    vec![0; kv_dim / group],
                    vec![0; kv_dim / group],
                ],
                Some(b) => {
                    let mut rows = PackedRows::new(b, group, kv_heads, head_dim, OffsetMode::Stored);
                    rows.push_token(&row);
                    packed_words(&rows)
                }
            };
            let what = format!(
                "token {i} ({bits} bits, group {group}, scaled {scaled}), {}",
                ["K", "V"][side]
            );
            let at = 6 * i + 3 * side;
            assert_eq!(lines[at], data, "codes, {what}");
            assert_eq!(lines[at + 1], scales, "scales, {what}");
            assert_eq!(lines[at + 2], offsets, "offsets, {what}");
        }
    }
}

/// The argument structs the host fills are laid out as the kernels read them: sizes and field offsets of the
/// Rust mirrors equal the kernel source's (compiled by the host compiler, whose LP64 layout NVRTC shares), and
/// the combine launch's block size is the kernel's.
#[cfg(feature = "cuda-kernels")]
#[test]
fn the_hosts_argument_structs_are_laid_out_as_the_kernels_read_them() {
    use pmkvq::gpu::{DstArg, OutArg, SegArg, SeqArg};
    use std::mem::{offset_of, size_of};
    let lines = run("L\n");
    let v = |x: &[usize]| x.iter().map(|&a| a as u32).collect::<Vec<_>>();
    assert_eq!(
        lines[0],
        v(&[
            size_of::<SegArg>(),
            offset_of!(SegArg, v_off),
            offset_of!(SegArg, len),
            offset_of!(SegArg, bits),
            offset_of!(SegArg, start),
            offset_of!(SegArg, pad)
        ]),
        "pk_seg"
    );
    assert_eq!(
        lines[1],
        v(&[
            size_of::<SeqArg>(),
            offset_of!(SeqArg, seg_start),
            offset_of!(SeqArg, seg_count),
            offset_of!(SeqArg, stored),
            offset_of!(SeqArg, g),
            offset_of!(SeqArg, qscale),
            offset_of!(SeqArg, kinv),
            offset_of!(SeqArg, signs)
        ]),
        "pk_seq"
    );
    assert_eq!(
        lines[2],
        v(&[
            size_of::<DstArg>(),
            offset_of!(DstArg, v_off),
            offset_of!(DstArg, kinv),
            offset_of!(DstArg, bits),
            offset_of!(DstArg, g)
        ]),
        "pk_dst"
    );
    assert_eq!(
        lines[3],
        v(&[
            size_of::<OutArg>(),
            offset_of!(OutArg, ptr),
            offset_of!(OutArg, ld),
            offset_of!(OutArg, start),
            offset_of!(OutArg, parts),
            offset_of!(OutArg, accumulate)
        ]),
        "pk_out"
    );
    assert_eq!(
        lines[4],
        v(&[
            pmkvq::gpu::model::COMBINE_THREADS as usize,
            pmkvq::gpu::model::ATTENTION_HEADS,
            pmkvq::gpu::model::TOKEN_TILE
        ]),
        "PK_COMBINE_THREADS, PK_GQA, PK_TT"
    );
}
