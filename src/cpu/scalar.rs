//! Scalar kernels: the specification every SIMD kernel is tested against.

use super::{Q8Row, QK};
use half::f16;

#[inline]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// llama.cpp's x86 `quantize_row_q8_1` (which also yields `quantize_row_q8_0`'s codes and scale):
/// `d = amax/127`, codes `x·(127/amax)` rounded half to even (its AVX path rounds with
/// `_MM_ROUND_NEAREST`), `d` and `s = d·Σq` stored as f16.
pub fn quantize_q8(x: &[f32], out: &mut Q8Row) {
    debug_assert!(x.len().is_multiple_of(QK));
    let nb = x.len() / QK;
    out.d.clear();
    out.s.clear();
    out.qs.clear();
    out.qs.reserve(x.len());
    for blk in x.chunks_exact(QK) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        let mut sum = 0i32;
        for &v in blk {
            let q = (v * id).round_ties_even() as i8;
            sum += q as i32;
            out.qs.push(q);
        }
        out.d.push(f16::from_f32(d).to_f32());
        out.s.push(f16::from_f32(sum as f32 * d).to_f32());
    }
    debug_assert_eq!(out.d.len(), nb);
}

pub fn dot_q4_0(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(18).enumerate() {
        let q8 = &x.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += ((blk[2 + j] & 0x0F) as i32 - 8) * q8[j] as i32;
            sumi += ((blk[2 + j] >> 4) as i32 - 8) * q8[j + 16] as i32;
        }
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    acc
}

pub fn dot_q4_1(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(20).enumerate() {
        let q8 = &x.qs[b * QK..(b + 1) * QK];
        let mut sumi = 0i32;
        for j in 0..16 {
            sumi += (blk[4 + j] & 0x0F) as i32 * q8[j] as i32;
            sumi += (blk[4 + j] >> 4) as i32 * q8[j + 16] as i32;
        }
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32 + f16_at(blk, 2) * x.s[b];
    }
    acc
}

/// llama.cpp's `ggml_vec_dot_q5_0_q8_0`: per block the exact integer sum of `(q − 16)·x`, times `dw·dx`.
pub fn dot_q5_0(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(22).enumerate() {
        let q8 = &x.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK).map(|i| (q5_0_code(blk, i) - 16) * q8[i] as i32).sum();
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    acc
}

/// Weight `i`'s 5-bit code (0..=31, the value `d·(q − 16)`) in a GGUF Q5_0 block: its low nibble (byte `i`, or
/// the high nibble of byte `i − 16`) and bit `i` of `qh`.
#[inline]
pub fn q5_0_code(blk: &[u8], i: usize) -> i32 {
    let qh = u32::from_le_bytes([blk[2], blk[3], blk[4], blk[5]]);
    let nib = if i < 16 {
        blk[6 + i] & 0x0F
    } else {
        blk[6 + i - 16] >> 4
    };
    nib as i32 | (((qh >> i) & 1) << 4) as i32
}

/// Weight `i`'s 6-bit code in a [`super::BlockFormat::Q6K32`] block.
#[inline]
pub fn q6k32_code(blk: &[u8], i: usize) -> i32 {
    let plane = |at: usize| u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]]);
    let nib = if i < 16 {
        blk[12 + i] & 0x0F
    } else {
        blk[12 + i - 16] >> 4
    };
    nib as i32 | (((plane(4) >> i) & 1) << 4) as i32 | (((plane(8) >> i) & 1) << 5) as i32
}

/// A [`super::BlockFormat::Q6K32`] row: per block and half the exact integer sum of `(q − 32)·x`, times
/// `d_half·dx`, the halves in order.
pub fn dot_q6k32(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(28).enumerate() {
        let q8 = &x.qs[b * QK..(b + 1) * QK];
        for half in 0..2 {
            let sumi: i32 = (16 * half..16 * half + 16)
                .map(|i| (q6k32_code(blk, i) - 32) * q8[i] as i32)
                .sum();
            acc += f16_at(blk, 2 * half) * x.d[b] * sumi as f32;
        }
    }
    acc
}

pub fn dot_q8_0(row: &[u8], x: &Q8Row) -> f32 {
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(34).enumerate() {
        let q8 = &x.qs[b * QK..(b + 1) * QK];
        let sumi: i32 = (0..QK).map(|j| (blk[2 + j] as i8) as i32 * q8[j] as i32).sum();
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    acc
}

pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

pub fn dot_f16(a: &[f16], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x.to_f32() * y).sum()
}

pub fn axpy_f16(w: f32, row: &[f16], acc: &mut [f32]) {
    for (a, v) in acc.iter_mut().zip(row) {
        *a += w * v.to_f32();
    }
}

pub fn exp_sum(x: &mut [f32], max: f32) -> f64 {
    let mut sum = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v as f64;
    }
    sum
}
