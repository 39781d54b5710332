//! NEON kernels (aarch64: Jetson Orin and other ARM boards), the same arithmetic as `scalar.rs`: integer block
//! sums are exact; only the order of the f32 accumulation differs. Widening multiplies (`smull` + `sadalp`) keep
//! to base ARMv8.0 so no CPU feature beyond NEON is needed.

use super::{scalar, Kernels, Q8Row, QK};
use half::f16;
use std::arch::aarch64::*;

pub fn supported() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

pub static NEON: Kernels = Kernels {
    name: "neon",
    quantize_q8: scalar::quantize_q8,
    dot_q4_0,
    dot_q4_1,
    dot_q8_0,
    dot4_q4_0: |w, x| x.map(|xi| dot_q4_0(w, xi)),
    dot4_q4_1: |w, x| x.map(|xi| dot_q4_1(w, xi)),
    dot4_q8_0: |w, x| x.map(|xi| dot_q8_0(w, xi)),
    dot_f32,
    dot_f16: scalar::dot_f16,
    axpy_f16: scalar::axpy_f16,
    exp_sum: scalar::exp_sum,
    panel_dot: None,
};

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Σ x[i]·y[i] over 32 signed bytes, exact, in i32.
///
/// # Safety
/// NEON must be available (always on aarch64).
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn dot32_i8(x0: int8x16_t, x1: int8x16_t, y0: int8x16_t, y1: int8x16_t) -> i32 {
    let mut acc = vdupq_n_s32(0);
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x0), vget_low_s8(y0)));
    acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(x0), vget_high_s8(y0)));
    acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(x1), vget_low_s8(y1)));
    acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(x1), vget_high_s8(y1)));
    vaddvq_s32(acc)
}

fn dot_q4<const WITH_MIN: bool>(row: &[u8], x: &Q8Row) -> f32 {
    let bb = if WITH_MIN { 20 } else { 18 };
    let nb = row.len() / bb;
    assert!(row.len() == nb * bb && x.d.len() >= nb && x.qs.len() >= nb * QK);
    let mut acc = 0.0f32;
    let mut acc_min = 0.0f32;
    for (b, blk) in row.chunks_exact(bb).enumerate() {
        let qs = &blk[if WITH_MIN { 4 } else { 2 }..];
        let y = &x.qs[b * QK..(b + 1) * QK];
        // SAFETY: `qs` has 16 bytes and `y` 32 (checked by the slicing above); NEON is baseline on aarch64.
        let sumi = unsafe {
            let v = vld1q_u8(qs.as_ptr());
            let lo = vandq_u8(v, vdupq_n_u8(0x0F));
            let hi = vshrq_n_u8(v, 4);
            let (mut l, mut h) = (vreinterpretq_s8_u8(lo), vreinterpretq_s8_u8(hi));
            if !WITH_MIN {
                l = vsubq_s8(l, vdupq_n_s8(8));
                h = vsubq_s8(h, vdupq_n_s8(8));
            }
            dot32_i8(l, h, vld1q_s8(y.as_ptr()), vld1q_s8(y.as_ptr().add(16)))
        };
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32;
        if WITH_MIN {
            acc_min += f16_at(blk, 2) * x.s[b];
        }
    }
    acc + acc_min
}

fn dot_q4_0(row: &[u8], x: &Q8Row) -> f32 {
    dot_q4::<false>(row, x)
}

fn dot_q4_1(row: &[u8], x: &Q8Row) -> f32 {
    dot_q4::<true>(row, x)
}

fn dot_q8_0(row: &[u8], x: &Q8Row) -> f32 {
    let nb = row.len() / 34;
    assert!(row.len() == nb * 34 && x.d.len() >= nb && x.qs.len() >= nb * QK);
    let mut acc = 0.0f32;
    for (b, blk) in row.chunks_exact(34).enumerate() {
        let y = &x.qs[b * QK..(b + 1) * QK];
        // SAFETY: `blk` has 34 bytes (32 codes after the scale), `y` 32; NEON is baseline on aarch64.
        let sumi = unsafe {
            let w = blk.as_ptr().add(2) as *const i8;
            dot32_i8(
                vld1q_s8(w),
                vld1q_s8(w.add(16)),
                vld1q_s8(y.as_ptr()),
                vld1q_s8(y.as_ptr().add(16)),
            )
        };
        acc += f16_at(blk, 0) * x.d[b] * sumi as f32;
    }
    acc
}

fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let mut i = 0;
    // SAFETY: every load reads 4 floats at i < n - 3 from both slices.
    let mut s = unsafe {
        let mut acc0 = vdupq_n_f32(0.0);
        let mut acc1 = vdupq_n_f32(0.0);
        while i + 8 <= n {
            acc0 = vfmaq_f32(acc0, vld1q_f32(a.as_ptr().add(i)), vld1q_f32(b.as_ptr().add(i)));
            acc1 = vfmaq_f32(acc1, vld1q_f32(a.as_ptr().add(i + 4)), vld1q_f32(b.as_ptr().add(i + 4)));
            i += 8;
        }
        vaddvq_f32(vaddq_f32(acc0, acc1))
    };
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}
