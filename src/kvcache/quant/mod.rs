//! The KV quantizer (spec §2), its packed layout, and the shifts that lower a code's bit-width (§3.6).
//!
//! Quantizer: asymmetric per group (group = head_dim by default), float offset `mn` (`round_zeros=False`),
//! `S = (max − min)/(2^b − 1)`, codes `round_half_even((x − mn)/S)` clamped to `[0, 2^b − 1]`, reconstruction
//! `q·S + mn`. No 1e-5 floor on the scale (§3.9, §9 item 3): a constant group has `S = 0` and is exact.
//!
//! Packed layout ("planes", chosen so SIMD unpacks a whole group with shifts and one mask): a group of `g` codes
//! at `b` bits takes `g·b/8` bytes. 8-bit: byte `j` = code `j`. 4-bit: byte `j < g/2` holds code `j` in its low
//! nibble and code `j + g/2` in its high nibble. 2-bit: byte `j < g/4` holds codes `j, j+g/4, j+g/2, j+3g/4` at
//! bits 0, 2, 4, 6. 16-bit: code `j` as little-endian `u16` at bytes `2j, 2j+1`. Groups must be multiples of 4.
//!
//! Scales and offsets are stored as f16 (0.5 bit per element at g = 64). Attention over packed rows lives in
//! `kvcache/attention/`.

pub mod rows;

pub use rows::{OffsetMode, PackedRows};

use half::f16;

/// Storage bit-widths. `#[repr(i32)]` values are the bit counts (mirrored by the CUDA header).
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum Bits {
    B2 = 2,
    B4 = 4,
    B8 = 8,
    B16 = 16,
}

impl Bits {
    pub const fn count(self) -> u32 {
        self as u32
    }
    pub const fn max_code(self) -> u32 {
        (1u32 << self.count()) - 1
    }
    /// One level down (16→8→4→2); `None` at the floor.
    pub const fn halved(self) -> Option<Bits> {
        match self {
            Bits::B16 => Some(Bits::B8),
            Bits::B8 => Some(Bits::B4),
            Bits::B4 => Some(Bits::B2),
            Bits::B2 => None,
        }
    }
    pub fn from_count(n: u32) -> Option<Bits> {
        match n {
            2 => Some(Bits::B2),
            4 => Some(Bits::B4),
            8 => Some(Bits::B8),
            16 => Some(Bits::B16),
            _ => None,
        }
    }
    /// Packed bytes of one group of `g` codes.
    pub const fn group_bytes(self, g: usize) -> usize {
        g * self.count() as usize / 8
    }
}

/// How a code is lowered from `2n` to `n` bits (the paper's ablation, §3.6). `#[repr(i32)]` values are
/// mirrored by the CUDA header (`PMKVQ_SHIFT_*`); `kernels/kv_shrink.cu` runs every mode.
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum ShiftMode {
    /// Equivalent Right Shift: `round(q/(2^n+1))` in integers; scale ×(2^n+1); offset unchanged. Exact.
    Equivalent = 0,
    /// Direct Right Shift: `q >> n`; scale ×(2^n+1); offset unchanged (biased).
    Direct = 1,
    /// Modified Right Shift: `q >> n`; scale ×2^n; offset moved to the bucket mean, `+ S·(2^n − 1)/2`.
    Modified = 2,
    /// Equivalent Right Shift down to 4 bits; a group that lands at the 2-bit floor then gets its scale and offset
    /// fitted by least squares to the values its 4-bit codes held ([`fit_group`]) instead of keeping the 4-bit
    /// group's min and max. Codes at 2 bits never shift again, so nothing relies on their grid being nested.
    Fitted = 3,
}

impl ShiftMode {
    /// Whether a group landing at `bits` under this mode is fitted rather than shifted.
    pub const fn fits_at(self, bits: Bits) -> bool {
        matches!((self, bits), (ShiftMode::Fitted, Bits::B2))
    }
}

/// Parameters of one quantized group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    pub scale: f32,
    pub offset: f32,
}

/// Quantize one group at `bits` (codes as u16, unpacked). Returns the exact (f32) parameters.
pub fn quantize_group(x: &[f32], bits: Bits, codes: &mut [u16]) -> GroupParams {
    let (mn, mx) = x
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let qmax = bits.max_code() as f32;
    let scale = (mx - mn) / qmax;
    if scale.is_nan() || scale <= 0.0 || !scale.is_finite() {
        // constant (or non-finite) group: every code 0, reconstructs to mn exactly
        codes.iter_mut().for_each(|c| *c = 0);
        return GroupParams {
            scale: 0.0,
            offset: if mn.is_finite() { mn } else { 0.0 },
        };
    }
    let inv = 1.0 / scale;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v - mn) * inv).round_ties_even().clamp(0.0, qmax) as u16;
    }
    GroupParams { scale, offset: mn }
}

/// Equivalent Right Shift of one code from `2n` to `n` bits: `((2^{2n} − 2^n + 1)(q + 2^{n−1})) >> 3n`,
/// which equals `round(q/(2^n+1))` for every `q` (proof in spec §3.6).
#[inline]
pub const fn ers(q: u32, n: u32) -> u32 {
    let m = (1u64 << (2 * n)) - (1u64 << n) + 1;
    ((m * (q as u64 + (1u64 << (n - 1)))) >> (3 * n)) as u32
}

/// Lower one code by one level under `mode`.
#[inline]
pub fn shift_code(q: u32, n: u32, mode: ShiftMode) -> u32 {
    match mode {
        ShiftMode::Equivalent | ShiftMode::Fitted => ers(q, n),
        ShiftMode::Direct | ShiftMode::Modified => q >> n,
    }
}

/// Lower a group's codes by one level (`2n` → `n` bits) under `mode`, in place. The ERS products fit u32 for every
/// level (16→8: at most 65281·65663 < 2³²), so the loop vectorizes.
pub fn shift_codes(codes: &mut [u16], n: u32, mode: ShiftMode) {
    match mode {
        ShiftMode::Equivalent | ShiftMode::Fitted => {
            let m = (1u32 << (2 * n)) - (1u32 << n) + 1;
            let (h, sh) = (1u32 << (n - 1), 3 * n);
            for c in codes.iter_mut() {
                *c = ((m * (*c as u32 + h)) >> sh) as u16;
            }
        }
        ShiftMode::Direct | ShiftMode::Modified => {
            for c in codes.iter_mut() {
                *c >>= n;
            }
        }
    }
}

/// The group parameters after lowering from `2n` to `n` bits under `mode`.
pub fn shift_params(p: GroupParams, n: u32, mode: ShiftMode) -> GroupParams {
    let two_n = (1u32 << n) as f32;
    match mode {
        ShiftMode::Equivalent | ShiftMode::Direct | ShiftMode::Fitted => GroupParams {
            scale: p.scale * (two_n + 1.0),
            offset: p.offset,
        },
        ShiftMode::Modified => GroupParams {
            scale: p.scale * two_n,
            offset: p.offset + p.scale * (two_n - 1.0) / 2.0,
        },
    }
}

/// One pass of `x` over the grid `p` (stored f16 parameters, `S > 0`) at `bits` (at most 4: 16 codes): each
/// value's code `clamp(round_half_even((x − mn)/S))`, counted and summed per code, and the squared error of the
/// reconstruction `q·S + mn` (in f64, in order).
struct GridPass {
    count: [u32; 16],
    sum: [f64; 16],
    err: f64,
}

fn grid_pass(x: &[f32], bits: Bits, p: GroupParams) -> GridPass {
    let qmax = bits.max_code() as f32;
    let inv = 1.0 / p.scale;
    let mut g = GridPass {
        count: [0; 16],
        sum: [0.0; 16],
        err: 0.0,
    };
    for &v in x {
        let q = ((v - p.offset) * inv).round_ties_even().clamp(0.0, qmax);
        let k = q as usize;
        g.count[k] += 1;
        g.sum[k] += v as f64;
        let d = (q * p.scale + p.offset - v) as f64;
        g.err += d * d;
    }
    g
}

/// Rounds of least squares [`fit_group`] runs at most (it stops earlier when the grid settles).
pub const FIT_ROUNDS: usize = 8;

/// The grid for `x` at `bits` (2 or 4) that least squares finds from `start` (stored f16 parameters): codes
/// are assigned on the grid, `(S, mn)` refitted to them in closed form (`x ≈ q·S + mn`, from each code's count
/// and sum), and the two alternate for at most [`FIT_ROUNDS`] rounds, a round kept only if its reconstruction
/// error is lower. Starting from a group's min/max grid this pulls the outer levels in toward where the values
/// are, which min/max cannot do: on Gaussian-like (rotated) groups of 64 the 2-bit squared error halves.
/// Returns the stored (f16) parameters; `codes` get the matching codes. A group with `S = 0` is left as it is.
pub fn fit_group(x: &[f32], bits: Bits, start: GroupParams, codes: &mut [u16]) -> GroupParams {
    debug_assert!(bits <= Bits::B4);
    let mut best = start;
    if start.scale > 0.0 && start.scale.is_finite() {
        let n = x.len() as f64;
        let mut pass = grid_pass(x, bits, start);
        for _ in 0..FIT_ROUNDS {
            let (mut sc, mut scc, mut sx, mut scx) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
            for k in 0..=bits.max_code() as usize {
                let (c, q) = (pass.count[k] as f64, k as f64);
                sc += c * q;
                scc += c * q * q;
                sx += pass.sum[k];
                scx += q * pass.sum[k];
            }
            let det = n * scc - sc * sc;
            if det <= 0.0 {
                break; // every value on one code: the grid cannot be refitted
            }
            let s = (n * scx - sc * sx) / det;
            let m = (sx - s * sc) / n;
            let p = GroupParams {
                scale: store_param(s as f32).to_f32(),
                offset: store_param(m as f32).to_f32(),
            };
            if !(p.scale > 0.0 && p.scale.is_finite() && p.offset.is_finite()) || p == best {
                break;
            }
            let next = grid_pass(x, bits, p);
            if next.err >= pass.err {
                break;
            }
            best = p;
            pass = next;
        }
        let qmax = bits.max_code() as f32;
        let inv = 1.0 / best.scale;
        for (c, &v) in codes.iter_mut().zip(x) {
            *c = ((v - best.offset) * inv).round_ties_even().clamp(0.0, qmax) as u16;
        }
    }
    best
}

/// Pack `codes` (one group) at `bits` into `out` (`bits.group_bytes(g)` bytes).
pub fn pack(codes: &[u16], bits: Bits, out: &mut [u8]) {
    let g = codes.len();
    match bits {
        Bits::B16 => {
            for (j, &c) in codes.iter().enumerate() {
                out[2 * j..2 * j + 2].copy_from_slice(&c.to_le_bytes());
            }
        }
        Bits::B8 => {
            for (o, &c) in out.iter_mut().zip(codes) {
                *o = c as u8;
            }
        }
        Bits::B4 => {
            let h = g / 2;
            for j in 0..h {
                out[j] = (codes[j] as u8 & 0x0F) | ((codes[j + h] as u8 & 0x0F) << 4);
            }
        }
        Bits::B2 => {
            let qd = g / 4;
            for j in 0..qd {
                out[j] = (codes[j] as u8 & 3)
                    | ((codes[j + qd] as u8 & 3) << 2)
                    | ((codes[j + 2 * qd] as u8 & 3) << 4)
                    | ((codes[j + 3 * qd] as u8 & 3) << 6);
            }
        }
    }
}

/// Unpack one group of `codes.len()` codes.
pub fn unpack(packed: &[u8], bits: Bits, codes: &mut [u16]) {
    let g = codes.len();
    match bits {
        Bits::B16 => {
            for (j, c) in codes.iter_mut().enumerate() {
                *c = u16::from_le_bytes([packed[2 * j], packed[2 * j + 1]]);
            }
        }
        Bits::B8 => {
            for (c, &b) in codes.iter_mut().zip(packed) {
                *c = b as u16;
            }
        }
        Bits::B4 => {
            let h = g / 2;
            for j in 0..h {
                codes[j] = (packed[j] & 0x0F) as u16;
                codes[j + h] = (packed[j] >> 4) as u16;
            }
        }
        Bits::B2 => {
            let qd = g / 4;
            for j in 0..qd {
                for k in 0..4 {
                    codes[j + k * qd] = ((packed[j] >> (2 * k)) & 3) as u16;
                }
            }
        }
    }
}

/// f16 storage of a group parameter (what the cache keeps).
#[inline]
pub fn store_param(v: f32) -> f16 {
    f16::from_f32(v)
}

/// q8_0 round trip of a query (32-element blocks, llama.cpp's reference rounding).
pub fn round_through_q8_0(q: &[f32]) -> Vec<f32> {
    let mut out = q.to_vec();
    for blk in out.chunks_mut(32) {
        let amax = blk.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = half::f16::from_f32(amax / 127.0).to_f32();
        let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
        for v in blk.iter_mut() {
            *v = (*v * id).round() * d;
        }
    }
    out
}

#[cfg(test)]
mod tests;
