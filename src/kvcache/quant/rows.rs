//! `PackedRows`: a run of tokens' K (or V) at one bit-width, packed, with per-group scale and offset.

use super::{
    fit_group, pack, quantize_group, shift_codes, shift_params, store_param, unpack, Bits, GroupParams, ShiftMode,
};
use half::f16;

/// Where a group's offset comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetMode {
    /// Stored per group (the PM-KVQ quantizer).
    Stored,
    /// `offset = −center·scale`, not stored: llama.cpp's symmetric q8_0 (center 128) and q4_0 (center 8).
    Symmetric { center: u16 },
}

/// Bytes of packed codes one token adds to a run of `values` values per token at `bits`, in groups of `group`.
pub const fn token_payload_bytes(bits: Bits, group: usize, values: usize) -> usize {
    values / group * bits.group_bytes(group)
}

/// True bytes one token adds to such a run: its codes, an f16 scale per group and, when offsets are stored, an
/// f16 offset per group. The one formula behind every true-byte budget (spec §3.5's accounting plus the
/// parameters the reference implementation leaves out).
pub const fn token_bytes(bits: Bits, group: usize, values: usize, offsets: OffsetMode) -> usize {
    let groups = values / group;
    let params = match offsets {
        OffsetMode::Stored => 4,
        OffsetMode::Symmetric { .. } => 2,
    };
    token_payload_bytes(bits, group, values) + params * groups
}

/// Whether runs can be packed in groups of `group` for heads of `head_dim` (what [`PackedRows::new`] requires).
pub const fn group_fits(group: usize, head_dim: usize) -> bool {
    group > 0 && group.is_multiple_of(4) && head_dim.is_multiple_of(group)
}

#[derive(Clone, Debug)]
pub struct PackedRows {
    pub bits: Bits,
    /// Elements per quantization group.
    pub group: usize,
    pub head_dim: usize,
    pub kv_heads: usize,
    pub offset_mode: OffsetMode,
    /// Packed codes, token-major: `[token][kv_head][group-in-head][bytes]`.
    pub data: Vec<u8>,
    pub scale: Vec<f16>,
    /// Empty in `Symmetric` mode.
    pub offset: Vec<f16>,
}

impl PackedRows {
    pub fn new(bits: Bits, group: usize, kv_heads: usize, head_dim: usize, offset_mode: OffsetMode) -> Self {
        assert!(
            group_fits(group, head_dim),
            "group {group} must divide head_dim {head_dim} and be a multiple of 4"
        );
        PackedRows {
            bits,
            group,
            head_dim,
            kv_heads,
            offset_mode,
            data: Vec::new(),
            scale: Vec::new(),
            offset: Vec::new(),
        }
    }

    /// An empty run with the same geometry at another width.
    pub fn empty_like(&self, bits: Bits) -> Self {
        PackedRows::new(bits, self.group, self.kv_heads, self.head_dim, self.offset_mode)
    }

    pub fn groups_per_token(&self) -> usize {
        self.kv_heads * self.head_dim / self.group
    }
    pub fn groups_per_head(&self) -> usize {
        self.head_dim / self.group
    }
    pub fn group_bytes(&self) -> usize {
        self.bits.group_bytes(self.group)
    }
    pub fn len(&self) -> usize {
        self.scale.len() / self.groups_per_token()
    }
    pub fn is_empty(&self) -> bool {
        self.scale.is_empty()
    }

    /// Bytes held (codes, scales, offsets).
    pub fn true_bytes(&self) -> usize {
        self.data.len() + 2 * self.scale.len() + 2 * self.offset.len()
    }
    /// Bytes of codes only (the reference implementation's accounting, spec §3.5).
    pub fn payload_bytes(&self) -> usize {
        self.data.len()
    }
    /// True bytes one more token would add.
    pub fn token_bytes(&self) -> usize {
        token_bytes(self.bits, self.group, self.kv_heads * self.head_dim, self.offset_mode)
    }

    /// Group `gi` (global index = token·groups_per_token + head·groups_per_head + k): bytes and parameters.
    #[inline]
    pub fn group_at(&self, gi: usize) -> (&[u8], f32, f32) {
        let gb = self.group_bytes();
        let scale = self.scale[gi].to_f32();
        let offset = match self.offset_mode {
            OffsetMode::Stored => self.offset[gi].to_f32(),
            OffsetMode::Symmetric { center } => -(center as f32) * scale,
        };
        (&self.data[gi * gb..(gi + 1) * gb], scale, offset)
    }

    fn push_group(&mut self, codes: &[u16], p: GroupParams) {
        let start = self.data.len();
        self.data.resize(start + self.group_bytes(), 0);
        pack(codes, self.bits, &mut self.data[start..]);
        self.scale.push(store_param(p.scale));
        if self.offset_mode == OffsetMode::Stored {
            self.offset.push(store_param(p.offset));
        }
    }

    /// Quantize and append one token (`kv_heads·head_dim` values) with the asymmetric quantizer.
    pub fn push_token(&mut self, x: &[f32]) {
        debug_assert_eq!(x.len(), self.kv_heads * self.head_dim);
        let mut codes = vec![0u16; self.group];
        for grp in x.chunks_exact(self.group) {
            let p = quantize_group(grp, self.bits, &mut codes);
            self.push_group(&codes, p);
        }
    }

    /// Append one token quantized like llama.cpp's `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`
    /// (symmetric, one f16 scale per group).
    pub fn push_token_symmetric(&mut self, x: &[f32]) {
        let OffsetMode::Symmetric { center } = self.offset_mode else {
            return self.push_token(x);
        };
        let mut codes = vec![0u16; self.group];
        for grp in x.chunks_exact(self.group) {
            let scale = match self.bits {
                Bits::B4 => {
                    // the value of largest magnitude, with its sign; d = max / -8
                    let max = grp
                        .iter()
                        .copied()
                        .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
                    let d = max / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (c, &v) in codes.iter_mut().zip(grp) {
                        *c = ((v * id + 8.5) as i32).clamp(0, 15) as u16;
                    }
                    d
                }
                _ => {
                    let amax = grp.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    for (c, &v) in codes.iter_mut().zip(grp) {
                        *c = ((v * id).round() as i32 + center as i32).clamp(0, self.bits.max_code() as i32) as u16;
                    }
                    d
                }
            };
            let start = self.data.len();
            self.data.resize(start + self.group_bytes(), 0);
            pack(&codes, self.bits, &mut self.data[start..]);
            self.scale.push(store_param(scale));
        }
    }

    /// Dequantize token `t` into `out` (`kv_heads·head_dim`).
    pub fn dequantize_token(&self, t: usize, out: &mut [f32]) {
        let gpt = self.groups_per_token();
        let mut codes = vec![0u16; self.group];
        for (k, o) in out.chunks_exact_mut(self.group).enumerate() {
            let (bytes, s, m) = self.group_at(t * gpt + k);
            unpack(bytes, self.bits, &mut codes);
            for (ov, &c) in o.iter_mut().zip(&codes) {
                *ov = c as f32 * s + m;
            }
        }
    }

    /// Move every token of `other` (same geometry and width) to the end of `self`.
    pub fn append(&mut self, other: &mut PackedRows) {
        debug_assert_eq!(self.bits, other.bits);
        self.data.append(&mut other.data);
        self.scale.append(&mut other.scale);
        self.offset.append(&mut other.offset);
    }

    /// Lower every group by one level (16→8→4→2) with `mode`; `false` at the 2-bit floor.
    /// Works in integers on the codes (ERS needs no float work, §3.6); the scale and offset are updated once per
    /// group from their stored values.
    pub fn shrink(&mut self, mode: ShiftMode) -> bool {
        match self.bits.halved() {
            Some(lower) => self.shrink_to(lower, mode) == 1,
            None => false,
        }
    }

    /// Lower to `bits` in one pass and return the levels lowered. Each group is unpacked once, its codes go
    /// through every level's shift in integers and its parameters through every level's update, rounded to the
    /// stored f16 at each level exactly as a chain of one-level shrinks stores them, and it is packed once at the
    /// target width: the result equals the chain bit for bit, for a fraction of its memory traffic.
    ///
    /// The rewrite is in place: group `g`'s narrower output lands at or before where group `g` was read (its
    /// codes are copied out first), so no second buffer is allocated and faulted in; the tail is then handed
    /// back to the allocator (a shrinking `realloc`: `mremap` for a large run, no copy).
    pub fn shrink_to(&mut self, bits: Bits, mode: ShiftMode) -> u32 {
        let mut levels = Vec::new();
        let mut b = self.bits;
        while b > bits {
            let Some(lower) = b.halved() else { break };
            levels.push(lower.count());
            b = lower;
        }
        if levels.is_empty() {
            return 0;
        }
        let groups = self.scale.len();
        let (ib, ob) = (self.group_bytes(), b.group_bytes(self.group));
        let mut codes = vec![0u16; self.group];
        let mut values = vec![0f32; self.group];
        let fits = self.offset_mode == OffsetMode::Stored && mode.fits_at(b);
        for gi in 0..groups {
            let mut p = {
                let (bytes, s, m) = self.group_at(gi);
                unpack(bytes, self.bits, &mut codes);
                GroupParams { scale: s, offset: m }
            };
            for &n in &levels {
                // the level that lands at the floor is fitted to what the codes held one level up, starting
                // from the shifted grid
                let fit_here = fits && n == b.count() && p.scale > 0.0;
                if fit_here {
                    for (v, &c) in values.iter_mut().zip(&codes) {
                        *v = c as f32 * p.scale + p.offset;
                    }
                }
                shift_codes(&mut codes, n, mode);
                let q = shift_params(p, n, mode);
                // what the one-level chain stores (and reads back) between levels
                let scale = store_param(q.scale).to_f32();
                p = GroupParams {
                    scale,
                    offset: match self.offset_mode {
                        OffsetMode::Stored => store_param(q.offset).to_f32(),
                        OffsetMode::Symmetric { center } => -(center as f32) * scale,
                    },
                };
                if fit_here {
                    p = fit_group(&values, b, p, &mut codes);
                }
            }
            // gi·ob + ob ≤ (gi + 1)·ib: this write never reaches a group not yet read
            debug_assert!(ob <= ib);
            pack(&codes, b, &mut self.data[gi * ob..(gi + 1) * ob]);
            self.scale[gi] = store_param(p.scale);
            if self.offset_mode == OffsetMode::Stored {
                self.offset[gi] = store_param(p.offset);
            }
        }
        self.data.truncate(groups * ob);
        self.data.shrink_to_fit();
        self.bits = b;
        levels.len() as u32
    }

    pub fn clear(&mut self) {
        self.data.clear();
        self.scale.clear();
        self.offset.clear();
    }

    /// Keep the first `tokens` tokens.
    pub fn truncate(&mut self, tokens: usize) {
        let g = tokens * self.groups_per_token();
        self.data.truncate(g * self.group_bytes());
        self.scale.truncate(g);
        if self.offset_mode == OffsetMode::Stored {
            self.offset.truncate(g);
        }
    }

    /// Split off tokens `[at, len)` into a new run.
    pub fn split_off(&mut self, at: usize) -> PackedRows {
        let g = at * self.groups_per_token();
        let mut out = self.empty_like(self.bits);
        out.data = self.data.split_off(g * self.group_bytes());
        out.scale = self.scale.split_off(g);
        if self.offset_mode == OffsetMode::Stored {
            out.offset = self.offset.split_off(g);
        }
        out
    }
}
