//! NEON fused attention over packed rows (groups that are multiples of 32; others use the scalar kernels).

use super::{scalar, AttnKernels};
use crate::kvcache::quant::{Bits, PackedRows};
use std::arch::aarch64::*;

pub fn supported() -> bool {
    std::arch::is_aarch64_feature_detected!("neon")
}

pub static NEON: AttnKernels = AttnKernels {
    name: "neon",
    scores,
    accumulate,
};

/// Codes of channels `c0..c0+8` of one packed group of `g` codes, as two f32x4.
///
/// # Safety
/// `c0` a multiple of 8 below `g`, `g` a multiple of 32, `bytes` the whole packed group.
#[inline(always)]
// SAFETY: an `unsafe fn` for its SIMD intrinsics; the contract is in its `# Safety` section.
unsafe fn codes8(bytes: &[u8], bits: Bits, c0: usize, g: usize) -> (float32x4_t, float32x4_t) {
    let p = bytes.as_ptr();
    let wide: uint16x8_t = match bits {
        Bits::B16 => vld1q_u16(p.add(2 * c0) as *const u16),
        Bits::B8 => vmovl_u8(vld1_u8(p.add(c0))),
        Bits::B4 => {
            let h = g / 2;
            if c0 < h {
                vmovl_u8(vand_u8(vld1_u8(p.add(c0)), vdup_n_u8(0x0F)))
            } else {
                vmovl_u8(vshr_n_u8(vld1_u8(p.add(c0 - h)), 4))
            }
        }
        Bits::B2 => {
            let qd = g / 4;
            let (k, j0) = (c0 / qd, c0 % qd);
            let b = vld1_u8(p.add(j0));
            // shift right by 2k: a negative left shift
            let sh = vshl_u8(b, vdup_n_s8(-(2 * k as i8)));
            vmovl_u8(vand_u8(sh, vdup_n_u8(3)))
        }
    };
    (
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(wide))),
        vcvtq_f32_u32(vmovl_u16(vget_high_u16(wide))),
    )
}

fn scores(rows: &PackedRows, head: usize, q: &[f32], scale: f32, t0: usize, out: &mut [f32]) {
    if !rows.group.is_multiple_of(32) {
        return scalar::scores(rows, head, q, scale, t0, out);
    }
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    assert!(q.len() >= gph * g);
    let qsum: Vec<f32> = q.chunks_exact(g).map(|c| c.iter().sum()).collect();
    for (t, o) in out.iter_mut().enumerate().take(rows.len().saturating_sub(t0)) {
        let mut s = 0.0f32;
        for (k, &qs) in qsum.iter().enumerate().take(gph) {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            assert!(bytes.len() == rows.bits.group_bytes(g));
            // SAFETY: g is a multiple of 32, every c0 < g is a multiple of 8, q has gph·g values (asserted).
            let dot = unsafe {
                let qk = q.as_ptr().add(k * g);
                let mut a0 = vdupq_n_f32(0.0);
                let mut a1 = vdupq_n_f32(0.0);
                for c0 in (0..g).step_by(8) {
                    let (lo, hi) = codes8(bytes, rows.bits, c0, g);
                    a0 = vfmaq_f32(a0, vld1q_f32(qk.add(c0)), lo);
                    a1 = vfmaq_f32(a1, vld1q_f32(qk.add(c0 + 4)), hi);
                }
                vaddvq_f32(vaddq_f32(a0, a1))
            };
            s += sc * dot + mn * qs;
        }
        *o = s * scale;
    }
}

fn accumulate(rows: &PackedRows, head: usize, p: &[f32], t0: usize, acc: &mut [f32]) {
    if !rows.group.is_multiple_of(32) {
        return scalar::accumulate(rows, head, p, t0, acc);
    }
    let (g, gph, gpt) = (rows.group, rows.groups_per_head(), rows.groups_per_token());
    assert!(acc.len() >= gph * g);
    for (t, &pt) in p.iter().enumerate().take(rows.len().saturating_sub(t0)) {
        for k in 0..gph {
            let (bytes, sc, mn) = rows.group_at((t0 + t) * gpt + head * gph + k);
            assert!(bytes.len() == rows.bits.group_bytes(g));
            // SAFETY: as in `scores`; `acc` has gph·g values (asserted).
            unsafe {
                let w = vdupq_n_f32(pt * sc);
                let base = vdupq_n_f32(pt * mn);
                let dst = acc.as_mut_ptr().add(k * g);
                for c0 in (0..g).step_by(8) {
                    let (lo, hi) = codes8(bytes, rows.bits, c0, g);
                    let d0 = vaddq_f32(vfmaq_f32(vld1q_f32(dst.add(c0)), w, lo), base);
                    let d1 = vaddq_f32(vfmaq_f32(vld1q_f32(dst.add(c0 + 4)), w, hi), base);
                    vst1q_f32(dst.add(c0), d0);
                    vst1q_f32(dst.add(c0 + 4), d1);
                }
            }
        }
    }
}
