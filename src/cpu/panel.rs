//! The panel layout: block weights regrouped so that one 32-bit lane of a 512-bit register holds one weight
//! row, and a matmul over many activation rows (prefill, batched decode) is a real GEMM micro-kernel: 16 output
//! rows × several activation rows per pass, a handful of instructions per 512 multiply-adds and row.
//!
//! Rows go in panels of [`PANEL_ROWS`] (16; the last panel holds the rest, `h` ≤ 16). A panel stores its blocks
//! column by column; block column `b` of a panel of `h` rows is `h` f16 scales, then (Q4_1) `h` f16 minimums,
//! then the rows' codes word by word: 32-bit word `k` of row `i`'s block at word `k·h + i`. A panel takes
//! exactly the bytes of its `h` GGUF rows and starts where its first row did, so the layout is a permutation
//! of each 16-row slab ([`interleave`], undone by [`deinterleave`] for GPU uploads and [`gguf_row`] for
//! embedding lookups). Q8_0 codes are stored biased by 128 (as `u8`), the operand order `vpdpbusd` wants.
//!
//! Word `k` of a Q4 block holds weights `4k..4k+4` in its low nibbles and `16+4k..16+4k+4` in its high ones
//! (GGUF's order), so the low and high nibbles of word `k` meet activation words `k` and `4+k` of the block.
//! Activations stay in their Q8 rows ([`Q8Panel`]), with the integer correction `−center·Σq` per block for
//! the formats whose codes are offset (Q4_0: 8, Q8_0: 128), which starts each block's integer sum so the offset
//! costs nothing in the loop: block dots are llama.cpp's integer block dots, exactly.
//!
//! Q5_0's code words are its fifth bits `qh` (word 0, transposed by [`qh_to_panel`] so that one shift and one
//! mask put any operand's fifth bits at bit 4 of its bytes) and then its four nibble words; its center is 16.
//! Q6K32 has two scales (one per 16 weights: the low nibbles' operands 0–3, the high ones' 4–7), its bit-4 and
//! bit-5 planes transposed the same way (words 0 and 1), then four nibble words; center 32, corrected per 16.

use super::{BlockFormat, Q8Row, QK};
use half::f16;

/// Weight rows per panel: one per 32-bit lane of a 512-bit register.
pub const PANEL_ROWS: usize = 16;

/// Bytes of the f16 parameters that open a GGUF block, and of its codes.
pub const fn split(format: BlockFormat) -> (usize, usize) {
    match format {
        BlockFormat::Q4_0 => (2, 16),
        BlockFormat::Q4_1 => (4, 16),
        BlockFormat::Q8_0 => (2, 32),
        BlockFormat::Q5_0 => (2, 20),
        BlockFormat::Q6K32 => (4, 24),
    }
}

/// Q5_0's fifth bits as the panel layout stores them: bit `8j + K` is the fifth bit of operand `K`'s byte `j`
/// (operand K < 4: the low nibbles of nibble word K; K ≥ 4: the high nibbles of word K − 4), which is GGUF `qh`
/// bit `4K + j`.
pub fn qh_to_panel(qh: u32) -> u32 {
    let mut o = 0;
    for k in 0..8 {
        for j in 0..4 {
            o |= ((qh >> (4 * k + j)) & 1) << (8 * j + k);
        }
    }
    o
}

/// Undo [`qh_to_panel`].
pub fn qh_from_panel(p: u32) -> u32 {
    let mut o = 0;
    for k in 0..8 {
        for j in 0..4 {
            o |= ((p >> (8 * j + k)) & 1) << (4 * k + j);
        }
    }
    o
}

/// A code word moved into (`to_panel`) or out of the panel layout: Q8_0 codes flip their sign bit, Q5_0's
/// fifth bits (word 0) and Q6K32's bit planes (words 0, 1) are transposed.
fn code_word(format: BlockFormat, k: usize, w: [u8; 4], to_panel: bool) -> [u8; 4] {
    match (format, k) {
        (BlockFormat::Q8_0, _) => w.map(|b| b ^ 0x80),
        (BlockFormat::Q5_0, 0) | (BlockFormat::Q6K32, 0 | 1) => {
            let v = u32::from_le_bytes(w);
            (if to_panel { qh_to_panel(v) } else { qh_from_panel(v) }).to_le_bytes()
        }
        _ => w,
    }
}

/// The panels of a matrix of `rows` rows: `(first row, h)`.
pub fn panels(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..rows.div_ceil(PANEL_ROWS)).map(move |p| {
        let r0 = p * PANEL_ROWS;
        (r0, PANEL_ROWS.min(rows - r0))
    })
}

fn permute(format: BlockFormat, rows: usize, src: &[u8], dst: &mut [u8], to_panel: bool) {
    let bb = format.block_bytes();
    assert!(rows > 0 && src.len() == dst.len() && src.len().is_multiple_of(rows * bb));
    let nb = src.len() / rows / bb;
    let (params, codes) = split(format);
    for (r0, h) in panels(rows) {
        for b in 0..nb {
            let unit = r0 * nb * bb + b * h * bb;
            for i in 0..h {
                let g = ((r0 + i) * nb + b) * bb;
                for q in 0..params / 2 {
                    let (from, to) = if to_panel {
                        (g + 2 * q, unit + 2 * (q * h + i))
                    } else {
                        (unit + 2 * (q * h + i), g + 2 * q)
                    };
                    dst[to..to + 2].copy_from_slice(&src[from..from + 2]);
                }
                for k in 0..codes / 4 {
                    let (gw, pw) = (g + params + 4 * k, unit + params * h + 4 * (k * h + i));
                    let (from, to) = if to_panel { (gw, pw) } else { (pw, gw) };
                    let w = [src[from], src[from + 1], src[from + 2], src[from + 3]];
                    dst[to..to + 4].copy_from_slice(&code_word(format, k, w, to_panel));
                }
            }
        }
    }
}

/// A matrix of `rows` GGUF rows of `format` blocks (`gguf`), laid out in panels.
pub fn interleave(format: BlockFormat, rows: usize, gguf: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; gguf.len()];
    permute(format, rows, gguf, &mut out, true);
    out
}

/// Undo [`interleave`].
pub fn deinterleave(format: BlockFormat, rows: usize, panel: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; panel.len()];
    permute(format, rows, panel, &mut out, false);
    out
}

/// GGUF row `r` (`out`: one row's bytes) of a matrix of `rows` rows in the panel layout.
pub fn gguf_row(format: BlockFormat, rows: usize, panel: &[u8], r: usize, out: &mut [u8]) {
    let bb = format.block_bytes();
    let nb = out.len() / bb;
    let (params, codes) = split(format);
    let r0 = r / PANEL_ROWS * PANEL_ROWS;
    let (h, i) = (PANEL_ROWS.min(rows - r0), r - r0);
    for (b, blk) in out.chunks_exact_mut(bb).enumerate() {
        let unit = r0 * nb * bb + b * h * bb;
        for q in 0..params / 2 {
            let at = unit + 2 * (q * h + i);
            blk[2 * q..2 * q + 2].copy_from_slice(&panel[at..at + 2]);
        }
        for k in 0..codes / 4 {
            let at = unit + params * h + 4 * (k * h + i);
            let w = [panel[at], panel[at + 1], panel[at + 2], panel[at + 3]];
            blk[params + 4 * k..params + 4 * k + 4].copy_from_slice(&code_word(format, k, w, false));
        }
    }
}

/// A quantized activation row and, per block, the integer correction `−center·Σq` for weights of one format.
#[derive(Default, Clone, Debug)]
pub struct Q8Panel {
    pub q: Q8Row,
    pub corr: Vec<i32>,
}

impl Q8Panel {
    pub fn new(q: Q8Row, format: BlockFormat) -> Q8Panel {
        let center = match format {
            BlockFormat::Q4_0 => 8,
            BlockFormat::Q4_1 => 0,
            BlockFormat::Q8_0 => 128,
            BlockFormat::Q5_0 => 16,
            BlockFormat::Q6K32 => 32,
        };
        let corr = q.qs[..q.blocks() * QK]
            .chunks_exact(Self::group(format))
            .map(|b| -center * b.iter().map(|&v| v as i32).sum::<i32>())
            .collect();
        Q8Panel { q, corr }
    }

    pub fn blocks(&self) -> usize {
        self.q.blocks()
    }

    /// Activations per correction: 16 for Q6K32 (a scale per 16 weights), else the block.
    pub const fn group(format: BlockFormat) -> usize {
        match format {
            BlockFormat::Q6K32 => 16,
            _ => QK,
        }
    }
}

/// The specification of the panel matmul (and the kernel of CPUs without a faster one): for one panel of `h`
/// rows (`panel`: its bytes), `out[j·h + i] = row i · xs[j]`, block by block in exact integers, then
/// `Σ_b (Σ_g isum_g·dw_g·dx + mw·s)` in block order (one group per block, Q6K32 two with a scale each).
pub fn dot_rows(format: BlockFormat, panel: &[u8], h: usize, xs: &[Q8Panel], out: &mut [f32]) {
    let bb = format.block_bytes();
    let nb = panel.len() / (h * bb);
    let params = split(format).0;
    let group = Q8Panel::group(format);
    let groups = QK / group;
    let f16_at = |at: usize| f16::from_le_bytes([panel[at], panel[at + 1]]).to_f32();
    for (x, o) in xs.iter().zip(out.chunks_exact_mut(h)) {
        for (i, o) in o.iter_mut().enumerate() {
            let mut acc = 0.0f32;
            for b in 0..nb {
                let unit = b * h * bb;
                let codes = panel_codes(format, &panel[unit + params * h..unit + h * bb], h, i);
                let xq = &x.q.qs[b * QK..(b + 1) * QK];
                for g in 0..groups {
                    let dot: i32 = (g * group..(g + 1) * group).map(|n| codes[n] * xq[n] as i32).sum();
                    // group g's scale is parameter g (Q6K32's second scale sits where Q4_1 keeps its minimum)
                    acc += (x.corr[groups * b + g] + dot) as f32 * (f16_at(unit + 2 * (g * h + i)) * x.q.d[b]);
                }
                if format == BlockFormat::Q4_1 {
                    acc += f16_at(unit + 2 * (h + i)) * x.q.s[b];
                }
            }
            *o = acc;
        }
    }
}

/// Row `i`'s 32 codes of one block column (`cols`: its code words) in weight order, as the panel kernels feed them
/// to `vpdpbusd`: unsigned, the center still in. Weight `4k + j` is byte `j` of operand `k`: Q8_0 code word `k`;
/// for the others the low (k < 4) or high nibble of nibble word `k mod 4`, plus Q5_0's fifth and Q6K32's fifth
/// and sixth bits from their transposed planes (bit `8j + k`), which precede the nibble words.
fn panel_codes(format: BlockFormat, cols: &[u8], h: usize, i: usize) -> [i32; QK] {
    let word = |k: usize| {
        let at = 4 * (k * h + i);
        [cols[at], cols[at + 1], cols[at + 2], cols[at + 3]]
    };
    let planes = match format {
        BlockFormat::Q5_0 => 1,
        BlockFormat::Q6K32 => 2,
        _ => 0,
    };
    let plane: [u32; 2] = std::array::from_fn(|p| if p < planes { u32::from_le_bytes(word(p)) } else { 0 });
    std::array::from_fn(|n| {
        let (k, j) = (n / 4, n % 4);
        if format == BlockFormat::Q8_0 {
            return word(k)[j] as i32;
        }
        let b = word(planes + k % 4)[j];
        let nibble = if k < 4 { b & 0x0F } else { b >> 4 };
        let high = (((plane[0] >> (8 * j + k)) & 1) << 4) | (((plane[1] >> (8 * j + k)) & 1) << 5);
        nibble as i32 | high as i32
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q5_fifth_bits_are_transposed_and_back() {
        let mut v = 0x9E37_79B9u32;
        for _ in 0..1000 {
            v = v.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            assert_eq!(qh_from_panel(qh_to_panel(v)), v);
            assert_eq!(qh_to_panel(v).count_ones(), v.count_ones());
        }
        // weight 4K + j's bit lands at 8j + K: weight 5 (K 1, j 1) at bit 9; weight 22 (K 5, j 2) at bit 21
        assert_eq!(qh_to_panel(1 << 5), 1 << 9);
        assert_eq!(qh_to_panel(1 << 22), 1 << 21);
    }

    #[test]
    fn interleaving_is_a_permutation_undone_by_deinterleaving() {
        for format in BlockFormat::ALL {
            let bb = format.block_bytes();
            for (rows, nb) in [(1usize, 1usize), (16, 18), (17, 3), (40, 2), (5, 48)] {
                let m: Vec<u8> = (0..rows * nb * bb).map(|i| (i * 37 % 251) as u8).collect();
                let p = interleave(format, rows, &m);
                assert_eq!(deinterleave(format, rows, &p), m, "{format:?} {rows}×{nb}");
                let mut row = vec![0u8; nb * bb];
                for r in [0, rows / 2, rows - 1] {
                    gguf_row(format, rows, &p, r, &mut row);
                    assert_eq!(row, m[r * nb * bb..(r + 1) * nb * bb], "{format:?} {rows}×{nb} row {r}");
                }
                // row 1's first code word is lane 1 of its panel's first word load
                if rows >= 2 && matches!(format, BlockFormat::Q4_0 | BlockFormat::Q4_1) {
                    let (params, _) = split(format);
                    let h = rows.min(PANEL_ROWS);
                    assert_eq!(
                        p[params * h + 4..params * h + 8],
                        m[nb * bb + params..nb * bb + params + 4]
                    );
                }
            }
        }
    }
}
