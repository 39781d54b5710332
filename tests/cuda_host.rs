//! The CUDA kernels that work one thread per group or row — `kv_quant.cu`, `kv_shrink.cu` (every shift mode,
//! the fitted 2-bit floor included: `pmkvq_fit.h`) and `forward.cu`'s `pk_rotate` (`pmkvq_rot.h`), the whole of
//! `forward.cu` compiled, its warp kernels left to the GPU — built with the host's C++ compiler and run on the
//! CPU, every (block, thread) in turn: they must give the host stores' codes, parameters and rotated rows bit for
//! bit, so a device cache holds what the CPU's holds. Only the CUDA words are stubbed (each `_rn` intrinsic is one
//! IEEE operation, which `-ffp-contract=off` keeps from being fused; f16 conversions go through `_Float16`, round
//! to nearest even like the GPU's `cvt.rn`). What this cannot check — the launches on a GPU, the warp kernels — is
//! `deploy/gpu-check.sh`'s.

use pmkvq::kvcache::quant::{Bits, OffsetMode, PackedRows, ShiftMode};
use pmkvq::kvcache::rotate::{rotation_block, Rotation};
use pmkvq::kvcache::{F32KvStore, KeyScaled, KvGeometry, KvTap, ROTATION_SEED};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, OnceLock};

const DRIVER: &str = r#"
// What NVRTC provides and the host does not: the CUDA words these kernels use, each with its IEEE meaning.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>
using std::isfinite;
using std::isinf;
using std::isnan;
#define __global__
#define __device__
#define __forceinline__ inline
struct pk_dim3 { unsigned x, y, z; };
static pk_dim3 blockIdx, blockDim, threadIdx;
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsub_rn(double a, double b) { return a - b; }
static inline double __ddiv_rn(double a, double b) { return a / b; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
// forward.cu's warp and block kernels (attention, matmuls, norms) are not run here: their primitives abort
#define __shared__ static
static void pk_no_warps() { fprintf(stderr, "a warp primitive ran on the host\n"); abort(); }
template <class T> static T __shfl_sync(unsigned, T, int) { pk_no_warps(); return T(); }
template <class T> static T __shfl_xor_sync(unsigned, T, int) { pk_no_warps(); return T(); }
static void __syncwarp() { pk_no_warps(); }
static void __syncthreads() { pk_no_warps(); }
static pk_dim3 gridDim;
using std::max;
using std::min;
struct uint4 { unsigned x, y, z, w; };

#include "pmkvq_rot.h"
#include "kv_quant.cu"
#include "kv_shrink.cu"
#include "forward.cu"

template <class T> static std::vector<T> read(int n) {
    std::vector<T> v(n);
    for (int i = 0; i < n; ++i) {
        unsigned u;
        if (scanf("%x", &u) != 1) throw 1;
        T x;
        memcpy(&x, &u, sizeof(T));  // little-endian: the low bytes of u
        v[i] = x;
    }
    return v;
}
template <class T> static void write(const std::vector<T>& v) {
    for (T x : v) { unsigned u = 0; memcpy(&u, &x, sizeof(T)); printf("%x ", u); }
    printf("\n");
}
// One launch of a one-thread-per-group kernel: every (block, thread) in turn, as the GPU would in any order.
template <class F> static void launch(int n_groups, F f) {
    blockDim.x = 128;
    for (unsigned b = 0; b * 128 < (unsigned)n_groups; ++b)
        for (unsigned t = 0; t < 128; ++t) { blockIdx.x = b; threadIdx.x = t; f(); }
}

// stdin, one command after another:
//   R q_heads kv_heads d block scale(bits) inverse scaled lanes / signs[d] / (qscale, kinv)[kv·d] if scaled /
//     q k v  ->  q, k, v after pmkvq_rotate_row over every lane
//   Q n_groups g bits / values[n_groups·g]  ->  packed bytes, f16 scales, f16 offsets (pmkvq_kv_quantize)
//   S n_groups g bits_in mode / bytes / scales / offsets  ->  the same one level down (pmkvq_kv_shrink)
//   F q_heads kv_heads d block scale(bits) inverse rows seqs / per sequence: rotates scaled [signs] [qscale kinv] /
//     row_seq / q k v  ->  q, k, v after pk_rotate over the grid (rows) × 32 threads
//   K n kv_dim g_min / per token: bits g has_kinv [kinv] / k v  ->  per token, K then V: bytes, scales, offsets
//     (bits 0: raw f16 rows, no parameters) after pk_kv_store
int main() {
    char op[2];
    while (scanf("%1s", op) == 1) {
        if (op[0] == 'R') {
            int qh, kvh, d, block, inverse, scaled, lanes;
            unsigned sb;
            if (scanf("%d %d %d %d %x %d %d %d", &qh, &kvh, &d, &block, &sb, &inverse, &scaled, &lanes) != 8) return 2;
            float scale;
            memcpy(&scale, &sb, 4);
            std::vector<float> signs = read<float>(d), qs, ki;
            if (scaled) { qs = read<float>(kvh * d); ki = read<float>(kvh * d); }
            std::vector<float> q = read<float>(qh * d), k = read<float>(kvh * d), v = read<float>(kvh * d);
            for (int lane = 0; lane < lanes; ++lane)
                pmkvq_rotate_row(lane, lanes, q.data(), inverse ? 0 : k.data(), inverse ? 0 : v.data(), signs.data(),
                                 scaled ? qs.data() : 0, scaled ? ki.data() : 0, qh, kvh, d, block, scale, inverse);
            write(q); write(k); write(v);
        } else if (op[0] == 'Q') {
            int n, g, bits;
            if (scanf("%d %d %d", &n, &g, &bits) != 3) return 2;
            std::vector<float> x = read<float>(n * g);
            std::vector<pmkvq_u8> out(n * g * bits / 8);
            std::vector<pmkvq_u16> sc(n), of(n);
            launch(n, [&] { pmkvq_kv_quantize(x.data(), n, g, bits, out.data(), sc.data(), of.data()); });
            write(out); write(sc); write(of);
        } else if (op[0] == 'S') {
            int n, g, bits, mode;
            if (scanf("%d %d %d %d", &n, &g, &bits, &mode) != 4) return 2;
            std::vector<pmkvq_u8> in = read<pmkvq_u8>(n * g * bits / 8);
            std::vector<pmkvq_u16> sc = read<pmkvq_u16>(n), of = read<pmkvq_u16>(n);
            std::vector<pmkvq_u8> out(n * g * bits / 16);
            launch(n, [&] { pmkvq_kv_shrink(in.data(), n, g, bits, mode, out.data(), sc.data(), of.data()); });
            write(out); write(sc); write(of);
        } else if (op[0] == 'F') {
            // pk_rotate itself over a step's rows: per sequence, whether it rotates and has key scales
            int qh, kvh, d, block, inverse, t, ns;
            unsigned sb;
            if (scanf("%d %d %d %d %x %d %d %d", &qh, &kvh, &d, &block, &sb, &inverse, &t, &ns) != 8) return 2;
            float scale;
            memcpy(&scale, &sb, 4);
            std::vector<std::vector<float>> keep;  // the tables' storage
            std::vector<pk_seq> seqs(ns);
            for (int i = 0; i < ns; ++i) {
                int rotates, scaled;
                if (scanf("%d %d", &rotates, &scaled) != 2) return 2;
                seqs[i] = pk_seq{};
                if (rotates) { keep.push_back(read<float>(d)); seqs[i].signs = (pk_ptr)keep.back().data(); }
                if (scaled) {
                    keep.push_back(read<float>(kvh * d));
                    seqs[i].qscale = (pk_ptr)keep.back().data();
                    keep.push_back(read<float>(kvh * d));
                    seqs[i].kinv = (pk_ptr)keep.back().data();
                }
            }
            std::vector<int> row_seq = read<int>(t);
            std::vector<float> q = read<float>(t * qh * d), k = read<float>(t * kvh * d), v = read<float>(t * kvh * d);
            blockDim.x = 32;
            for (int row = 0; row < t; ++row)
                for (unsigned th = 0; th < 32; ++th) {
                    blockIdx.x = row;
                    threadIdx.x = th;
                    pk_rotate(seqs.data(), row_seq.data(), q.data(), k.data(), v.data(), qh, kvh, d, block, scale,
                              inverse);
                }
            write(q); write(k); write(v);
        } else if (op[0] == 'K') {
            // pk_kv_store: each token's K and V into its own slot, at its width and group, keys times its kinv
            int n, kv_dim, g_min;
            if (scanf("%d %d %d", &n, &kv_dim, &g_min) != 3) return 2;
            std::vector<std::vector<float>> kinv(n);
            std::vector<std::vector<pmkvq_u8>> data(2 * n);
            std::vector<std::vector<pmkvq_u16>> params(4 * n);
            std::vector<pk_dst> dst(n);
            for (int i = 0; i < n; ++i) {
                int bits, g, has;
                if (scanf("%d %d %d", &bits, &g, &has) != 3) return 2;
                if (has) kinv[i] = read<float>(kv_dim);
                int groups = kv_dim / g, bytes = bits ? groups * g * bits / 8 : kv_dim * 2;
                for (int side = 0; side < 2; ++side) {
                    data[2 * i + side].assign(bytes, 0);
                    params[4 * i + 2 * side].assign(groups, 0);
                    params[4 * i + 2 * side + 1].assign(groups, 0);
                }
                dst[i] = pk_dst{(pk_ptr)data[2 * i].data(), (pk_ptr)params[4 * i].data(), (pk_ptr)params[4 * i + 1].data(),
                                (pk_ptr)data[2 * i + 1].data(), (pk_ptr)params[4 * i + 2].data(),
                                (pk_ptr)params[4 * i + 3].data(), has ? (pk_ptr)kinv[i].data() : 0, bits, g};
            }
            std::vector<float> k = read<float>(n * kv_dim), v = read<float>(n * kv_dim);
            int threads = n * 2 * (kv_dim / g_min);
            blockDim.x = 128;
            for (int b = 0; b * 128 < threads; ++b)
                for (unsigned th = 0; th < 128; ++th) {
                    blockIdx.x = b;
                    threadIdx.x = th;
                    pk_kv_store(dst.data(), k.data(), v.data(), n, kv_dim, g_min);
                }
            for (int i = 0; i < n; ++i)
                for (int side = 0; side < 2; ++side) {
                    write(data[2 * i + side]); write(params[4 * i + 2 * side]); write(params[4 * i + 2 * side + 1]);
                }
        } else {
            return 2;
        }
    }
    return 0;
}
"#;

fn kernels() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kernels")
}

/// The driver, built once per test process with the host C++ compiler (`CXX`, else `c++`): a missing compiler
/// fails the tests.
fn driver() -> &'static PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("pmkvq-cuda-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("driver.cpp");
        std::fs::write(&src, DRIVER).unwrap();
        let exe = dir.join("driver");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
        let out = Command::new(&cxx)
            .args(["-O2", "-std=c++17", "-ffp-contract=off", "-I"])
            .arg(kernels())
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("the host C++ compiler `{cxx}` is needed to run the kernels on the CPU: {e}"));
        assert!(
            out.status.success(),
            "compiling the kernels on the host:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// Run the driver on `input`; one line of hex words per output.
fn run(input: &str) -> Vec<Vec<u32>> {
    let mut child = Command::new(driver())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // written from another thread: the driver's output fills its pipe long before it has read all of this
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_string();
    let writer = std::thread::spawn(move || stdin.write_all(input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success(), "driver exited with {}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.split_whitespace()
                .map(|w| u32::from_str_radix(w, 16).unwrap())
                .collect()
        })
        .collect()
}

fn words<T: Copy + Into<u32>>(v: &[T]) -> String {
    v.iter().map(|&x| format!("{:x} ", x.into())).collect::<String>() + "\n"
}

struct Case {
    geom: KvGeometry,
    layer: usize,
    inverse: bool,
    scales: Option<Vec<f32>>,
    lanes: usize,
}

fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            // a few outlier channels, as real keys have
            if i % 23 == 5 {
                u * 40.0
            } else {
                u * 3.0
            }
        })
        .collect()
}

fn hex(v: &[f32]) -> String {
    v.iter().map(|x| format!("{:08x} ", x.to_bits())).collect()
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
