//! The ground floor: CPU kernels over plain slices, which import nothing else of this crate.
//!
//! `model` (matmuls, embeddings) and `kvcache` (attention arithmetic: `dot_f32`, `dot_f16`, `axpy_f16`,
//! `exp_sum`) both stand on this module; neither reaches into the other for arithmetic (candle keeps its `cpu/`
//! under everything the same way). `tests/architecture.rs` holds it to importing nothing of ours.
//!
//! Owns: the byte layouts of the GGUF block types we execute natively (Q4_0, Q4_1, Q8_0, Q5_0, F16, F32, and our
//! Q6K32) and the load-time rewrites of others into them (`convert.rs`: Q5_0 → Q8_0 where no kernel reads Q5_0,
//! Q4_K → Q4_1, Q6_K → Q6K32), the
//! quantization of activations to 8-bit blocks (llama.cpp's `quantize_row_q8_0/q8_1`, so our numerics follow
//! the peer's), the per-row dot products, and the panel layout with its matmul (`panel.rs`: 16 weight rows per
//! register lane set, laid out at load where a panel kernel exists). `scalar.rs` and `panel::dot_rows` are the
//! specification; `avx512.rs` (the panel kernel, AVX-512 VNNI), `avx2.rs` (AVX2+FMA+F16C) and `neon.rs` are
//! chosen once at start-up and tested equal to them.
//! Does not own: threading or matrix shapes (see `model/linear.rs`), packed KV codes (see `kvcache/attention/`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod convert;
#[cfg(target_arch = "aarch64")]
mod neon;
pub mod panel;
mod scalar;

pub use convert::{q4_k_to_q4_1, q5_0_to_q8_0, q6_k_to_q6k32};

use half::f16;
use std::sync::OnceLock;

/// Elements per quantization block of every 8/4-bit GGUF format we run.
pub const QK: usize = 32;

/// Weight formats with a native kernel; the byte size of one 32-element block of each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockFormat {
    Q4_0,
    Q4_1,
    Q8_0,
    /// `x = d·(q − 16)`, q 5-bit: f16 `d`, 32 fifth bits `qh`, 16 bytes of low nibbles. Runs natively in the
    /// panel kernels; CPUs without one get it widened to Q8_0 at load ([`q5_0_to_q8_0`], the same values).
    Q5_0,
    /// Q6_K's codes and scales regrouped per 32 weights (ours, not a GGUF layout; [`q6_k_to_q6k32`]): two f16
    /// scales (`d·sc` of each 16), the 32 codes' bit-4 and bit-5 planes (bit `i` for weight `i`), 16 bytes of low
    /// nibbles (Q4's order); `x = d_half·(q − 32)`. Built at load only where a panel kernel runs it.
    Q6K32,
}

impl BlockFormat {
    /// Every format, for tests that cover them all.
    pub const ALL: [BlockFormat; 5] = [
        BlockFormat::Q4_0,
        BlockFormat::Q4_1,
        BlockFormat::Q8_0,
        BlockFormat::Q5_0,
        BlockFormat::Q6K32,
    ];

    pub const fn block_bytes(self) -> usize {
        match self {
            BlockFormat::Q4_0 => 18,
            BlockFormat::Q4_1 => 20,
            BlockFormat::Q8_0 => 34,
            BlockFormat::Q5_0 => 22,
            BlockFormat::Q6K32 => 28,
        }
    }
    /// Q4_1 pairs with Q8_1 activations (they carry the block sum for the min term); the others with Q8_0.
    pub const fn needs_block_sum(self) -> bool {
        matches!(self, BlockFormat::Q4_1)
    }
}

/// An activation row quantized to 8-bit blocks of 32: `x ≈ d·q`, with `s = d·Σq` (llama.cpp's Q8_1 `s`).
/// `d` and `s` are rounded through f16 exactly as llama.cpp stores them.
#[derive(Default, Clone, Debug)]
pub struct Q8Row {
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub qs: Vec<i8>,
}

impl Q8Row {
    pub fn blocks(&self) -> usize {
        self.d.len()
    }
}

/// The kernel table, filled once with the best implementation this CPU supports.
pub struct Kernels {
    pub name: &'static str,
    pub quantize_q8: fn(&[f32], &mut Q8Row),
    /// Dot of one weight row (its blocks as bytes) with a quantized activation row.
    pub dot_q4_0: fn(&[u8], &Q8Row) -> f32,
    pub dot_q4_1: fn(&[u8], &Q8Row) -> f32,
    pub dot_q8_0: fn(&[u8], &Q8Row) -> f32,
    /// The same dot products of one weight row with four activation rows at once (prefill, batched decode):
    /// the weight block is loaded and unpacked once. Each result equals the single-row kernel's bit for bit.
    pub dot4_q4_0: fn(&[u8], [&Q8Row; 4]) -> [f32; 4],
    pub dot4_q4_1: fn(&[u8], [&Q8Row; 4]) -> [f32; 4],
    pub dot4_q8_0: fn(&[u8], [&Q8Row; 4]) -> [f32; 4],
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    /// Dot of an f16 row (little-endian bytes) with f32 values.
    pub dot_f16: fn(&[f16], &[f32]) -> f32,
    /// `acc += w · row` for an f16 row (attention's value accumulation).
    pub axpy_f16: fn(f32, &[f16], &mut [f32]),
    /// `x[i] = exp(x[i] − max)` in place; returns the sum (f64, as ggml's softmax keeps it).
    pub exp_sum: fn(&mut [f32], f32) -> f64,
    /// One panel of weight rows in the [`panel`] layout against several activation rows; `Some` where it
    /// beats the per-row kernels above (then block weights are laid out in panels at load).
    pub panel_dot: Option<PanelDot>,
}

/// `out[j·h + i] = row i · xs[j]` for a panel of `h` weight rows (its bytes) in the [`panel`] layout.
pub type PanelDot = fn(BlockFormat, &[u8], usize, &[panel::Q8Panel], &mut [f32]);

pub static SCALAR: Kernels = Kernels {
    name: "scalar",
    quantize_q8: scalar::quantize_q8,
    dot_q4_0: scalar::dot_q4_0,
    dot_q4_1: scalar::dot_q4_1,
    dot_q8_0: scalar::dot_q8_0,
    dot4_q4_0: |w, x| x.map(|xi| scalar::dot_q4_0(w, xi)),
    dot4_q4_1: |w, x| x.map(|xi| scalar::dot_q4_1(w, xi)),
    dot4_q8_0: |w, x| x.map(|xi| scalar::dot_q8_0(w, xi)),
    dot_f32: scalar::dot_f32,
    dot_f16: scalar::dot_f16,
    axpy_f16: scalar::axpy_f16,
    exp_sum: scalar::exp_sum,
    panel_dot: None,
};

/// A SIMD kernel table and the run-time check that this CPU can run it.
pub type SimdChoice<T> = (fn() -> bool, &'static T);

/// The first SIMD table whose CPU check passes, else `scalar`; decided once, in the caller's `cell`. Every kernel
/// table (these, the packed-code attention kernels) is chosen this way.
pub fn detect<T: Sync + 'static>(
    cell: &'static OnceLock<&'static T>,
    simd: &[SimdChoice<T>],
    scalar: &'static T,
) -> &'static T {
    cell.get_or_init(|| simd.iter().find(|(ok, _)| ok()).map_or(scalar, |&(_, t)| t))
}

/// The kernels for this CPU, detected on first use.
pub fn kernels() -> &'static Kernels {
    static CHOSEN: OnceLock<&'static Kernels> = OnceLock::new();
    detect(
        &CHOSEN,
        &[
            #[cfg(target_arch = "x86_64")]
            (avx512::supported, &avx512::AVX512),
            #[cfg(target_arch = "x86_64")]
            (avx2::supported, &avx2::AVX2),
            #[cfg(target_arch = "aarch64")]
            (neon::supported, &neon::NEON),
        ],
        &SCALAR,
    )
}

impl BlockFormat {
    pub fn dot(self, k: &Kernels, row: &[u8], x: &Q8Row) -> f32 {
        match self {
            BlockFormat::Q4_0 => (k.dot_q4_0)(row, x),
            BlockFormat::Q4_1 => (k.dot_q4_1)(row, x),
            BlockFormat::Q8_0 => (k.dot_q8_0)(row, x),
            // GGUF rows of Q5_0 exist only where a caller holds them unconverted (tests): the specification.
            BlockFormat::Q5_0 => scalar::dot_q5_0(row, x),
            BlockFormat::Q6K32 => scalar::dot_q6k32(row, x),
        }
    }

    pub fn dot4(self, k: &Kernels, row: &[u8], x: [&Q8Row; 4]) -> [f32; 4] {
        match self {
            BlockFormat::Q4_0 => (k.dot4_q4_0)(row, x),
            BlockFormat::Q4_1 => (k.dot4_q4_1)(row, x),
            BlockFormat::Q8_0 => (k.dot4_q8_0)(row, x),
            BlockFormat::Q5_0 => x.map(|xi| scalar::dot_q5_0(row, xi)),
            BlockFormat::Q6K32 => x.map(|xi| scalar::dot_q6k32(row, xi)),
        }
    }
}

/// Dequantize one row of blocks to f32 (embedding lookup, tests).
pub fn dequantize_row(format: BlockFormat, row: &[u8], out: &mut [f32]) {
    let bb = format.block_bytes();
    for (b, chunk) in row.chunks_exact(bb).enumerate() {
        let d = f16::from_le_bytes([chunk[0], chunk[1]]).to_f32();
        let o = &mut out[b * QK..(b + 1) * QK];
        match format {
            BlockFormat::Q4_0 => {
                for j in 0..16 {
                    o[j] = d * ((chunk[2 + j] & 0x0F) as i32 - 8) as f32;
                    o[j + 16] = d * ((chunk[2 + j] >> 4) as i32 - 8) as f32;
                }
            }
            BlockFormat::Q4_1 => {
                let m = f16::from_le_bytes([chunk[2], chunk[3]]).to_f32();
                for j in 0..16 {
                    o[j] = d * (chunk[4 + j] & 0x0F) as f32 + m;
                    o[j + 16] = d * (chunk[4 + j] >> 4) as f32 + m;
                }
            }
            BlockFormat::Q8_0 => {
                for j in 0..QK {
                    o[j] = d * (chunk[2 + j] as i8) as f32;
                }
            }
            BlockFormat::Q5_0 => {
                for (i, o) in o.iter_mut().enumerate() {
                    *o = d * (scalar::q5_0_code(chunk, i) - 16) as f32;
                }
            }
            BlockFormat::Q6K32 => {
                let dh = f16::from_le_bytes([chunk[2], chunk[3]]).to_f32();
                for (i, o) in o.iter_mut().enumerate() {
                    *o = (if i < 16 { d } else { dh }) * (scalar::q6k32_code(chunk, i) - 32) as f32;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn random_blocks(format: BlockFormat, blocks: usize, seed: &mut u64) -> Vec<u8> {
        let mut out = Vec::new();
        for _ in 0..blocks {
            let d = f16::from_f32(lcg(seed).abs() * 0.1 + 0.01).to_le_bytes();
            out.extend_from_slice(&d);
            if matches!(format, BlockFormat::Q4_1 | BlockFormat::Q6K32) {
                out.extend_from_slice(&f16::from_f32(lcg(seed) * 0.5).to_le_bytes());
            }
            let payload = match format {
                BlockFormat::Q8_0 => 32,
                BlockFormat::Q5_0 => 20,
                BlockFormat::Q6K32 => 24,
                _ => 16,
            };
            for _ in 0..payload {
                let v = (lcg(seed) * 127.0) as i8 as u8;
                out.push(v);
            }
        }
        out
    }

    /// An activation row of `blocks` blocks, uniform in ±`amp`, quantized by the scalar specification.
    fn random_q8(blocks: usize, amp: f32, seed: &mut u64) -> Q8Row {
        let x: Vec<f32> = (0..blocks * QK).map(|_| lcg(seed) * amp).collect();
        let mut q = Q8Row::default();
        scalar::quantize_q8(&x, &mut q);
        q
    }

    #[test]
    fn quantize_q8_follows_llama_cpp() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let mut q = Q8Row::default();
        scalar::quantize_q8(&x, &mut q);
        let d = f16::from_f32(21.0 / 127.0).to_f32();
        assert_eq!(q.d[0], d);
        assert_eq!(q.qs[31], 127);
        assert_eq!(q.qs[0], (-10.0f32 * (127.0 / 21.0)).round_ties_even() as i8);
        let sum: i32 = q.qs.iter().map(|&v| v as i32).sum();
        assert_eq!(q.s[0], f16::from_f32(sum as f32 * (21.0 / 127.0)).to_f32());
    }

    #[test]
    fn q_dots_match_dequantized_dot() {
        let mut seed = 7;
        for format in BlockFormat::ALL {
            let blocks = 5;
            let w = random_blocks(format, blocks, &mut seed);
            let x: Vec<f32> = (0..blocks * QK).map(|_| lcg(&mut seed)).collect();
            let mut q = Q8Row::default();
            scalar::quantize_q8(&x, &mut q);
            let mut wd = vec![0.0; blocks * QK];
            dequantize_row(format, &w, &mut wd);
            // reference: dequantized weights against the *dequantized* activations
            let xq: Vec<f32> = (0..blocks * QK).map(|i| q.d[i / QK] * q.qs[i] as f32).collect();
            let want: f32 = wd.iter().zip(&xq).map(|(a, b)| a * b).sum();
            let got = format.dot(&SCALAR, &w, &q);
            // Q4_1's min term uses the f16-rounded block sum, as llama.cpp does.
            assert!(
                (got - want).abs() <= 1e-2 * want.abs().max(1.0),
                "{format:?}: {got} vs {want}"
            );
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_avx2_match_scalar() {
        assert!(
            avx2::supported(),
            "this test machine has AVX2; a CPU without it needs its own test run"
        );
        simd_matches_scalar(&avx2::AVX2);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn kernels_avx512_match_scalar() {
        assert!(
            avx512::supported(),
            "this test machine has AVX-512 VNNI; a CPU without it needs its own test run"
        );
        simd_matches_scalar(&avx512::AVX512);
    }

    #[cfg(target_arch = "aarch64")]
    #[test]
    fn kernels_neon_match_scalar() {
        simd_matches_scalar(&neon::NEON);
    }

    /// The panel matmul (the scalar specification, and every table's `panel_dot`) against the scalar block
    /// kernels on GGUF rows; a table's batched results equal its one-row results bit for bit.
    #[test]
    fn panel_dots_match_the_block_dots() {
        let mut seed = 23;
        let tables: Vec<&Kernels> = [kernels()].into_iter().filter(|k| k.panel_dot.is_some()).collect();
        #[cfg(target_arch = "x86_64")]
        assert!(
            !avx512::supported() || tables.iter().any(|k| k.name == "avx512-vnni"),
            "this CPU has AVX-512 VNNI: its panel kernel must be under test"
        );
        for (rows, blocks) in [(1usize, 1usize), (16, 3), (21, 18), (40, 48), (7, 301)] {
            let acts: Vec<Q8Row> = (0..13).map(|_| random_q8(blocks, 2.5, &mut seed)).collect();
            for format in BlockFormat::ALL {
                let rb = blocks * format.block_bytes();
                let w = random_blocks(format, rows * blocks, &mut seed);
                let wp = panel::interleave(format, rows, &w);
                let xp: Vec<panel::Q8Panel> = acts.iter().map(|q| panel::Q8Panel::new(q.clone(), format)).collect();
                for (r0, h) in panel::panels(rows) {
                    let slab = &wp[r0 * rb..(r0 + h) * rb];
                    let want: Vec<f32> = acts
                        .iter()
                        .flat_map(|q| (r0..r0 + h).map(move |r| (r, q)))
                        .map(|(r, q)| format.dot(&SCALAR, &w[r * rb..(r + 1) * rb], q))
                        .collect();
                    let close = |what: &str, got: &[f32]| {
                        for (n, (a, b)) in want.iter().zip(got).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                                "{what} {format:?} {rows}×{blocks} panel {r0} out {n}: {a} vs {b}"
                            );
                        }
                    };
                    let mut spec = vec![0f32; want.len()];
                    panel::dot_rows(format, slab, h, &xp, &mut spec);
                    close("spec", &spec);
                    for k in &tables {
                        let dot = k.panel_dot.unwrap();
                        let mut all = vec![0f32; want.len()];
                        dot(format, slab, h, &xp, &mut all);
                        close(k.name, &all);
                        for j in 0..xp.len() {
                            let mut one = vec![0f32; h];
                            dot(format, slab, h, &xp[j..j + 1], &mut one);
                            for (a, b) in one.iter().zip(&all[j * h..(j + 1) * h]) {
                                assert_eq!(a.to_bits(), b.to_bits(), "{} {format:?} row {j}", k.name);
                            }
                        }
                    }
                }
            }
        }
    }

    #[allow(dead_code)]
    fn simd_matches_scalar(k: &Kernels) {
        let mut seed = 11;
        for blocks in [1usize, 3, 18, 48, 301] {
            let x: Vec<f32> = (0..blocks * QK).map(|_| lcg(&mut seed) * 3.0).collect();
            let (mut qa, mut qb) = (Q8Row::default(), Q8Row::default());
            scalar::quantize_q8(&x, &mut qa);
            (k.quantize_q8)(&x, &mut qb);
            assert_eq!(qa.qs, qb.qs);
            assert_eq!(qa.d, qb.d);
            assert_eq!(qa.s, qb.s);
            // three more activation rows for the 4-row kernels
            let more: Vec<Q8Row> = (0..3).map(|_| random_q8(blocks, 2.0, &mut seed)).collect();
            for format in BlockFormat::ALL {
                let w = random_blocks(format, blocks, &mut seed);
                let a = format.dot(&SCALAR, &w, &qa);
                let b = format.dot(k, &w, &qa);
                assert!(
                    (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                    "{format:?} {blocks}: {a} vs {b}"
                );
                // the batched form equals the single-row form bit for bit, row by row
                let rows = [&qa, &more[0], &more[1], &more[2]];
                let four = format.dot4(k, &w, rows);
                for (r, got) in rows.iter().zip(four) {
                    assert_eq!(
                        got.to_bits(),
                        format.dot(k, &w, r).to_bits(),
                        "{} {format:?} {blocks}",
                        k.name
                    );
                }
            }
        }
        for n in [1usize, 7, 8, 31, 64, 67, 200] {
            let a: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let b: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
            let h: Vec<f16> = a.iter().map(|&v| f16::from_f32(v)).collect();
            let (s, v) = ((SCALAR.dot_f32)(&a, &b), (k.dot_f32)(&a, &b));
            assert!((s - v).abs() < 1e-4, "dot_f32 {n}: {s} vs {v}");
            let (s, v) = ((SCALAR.dot_f16)(&h, &b), (k.dot_f16)(&h, &b));
            assert!((s - v).abs() < 1e-4, "dot_f16 {n}: {s} vs {v}");
            let (mut e_s, mut e_v) = (
                a.iter().map(|x| x * 30.0).collect::<Vec<f32>>(),
                a.iter().map(|x| x * 30.0).collect::<Vec<f32>>(),
            );
            let (ss, sv) = ((SCALAR.exp_sum)(&mut e_s, 5.0), (k.exp_sum)(&mut e_v, 5.0));
            assert!((ss - sv).abs() <= 1e-6 * ss, "exp_sum {n}: {ss} vs {sv}");
            for (x, y) in e_s.iter().zip(&e_v) {
                assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-30), "exp {x} vs {y}");
            }
            let (mut acc_s, mut acc_v) = (b.clone(), b.clone());
            (SCALAR.axpy_f16)(0.37, &h, &mut acc_s);
            (k.axpy_f16)(0.37, &h, &mut acc_v);
            for (x, y) in acc_s.iter().zip(&acc_v) {
                assert!((x - y).abs() < 1e-5, "axpy_f16 {n}");
            }
        }
    }
}
