//! The buffers and tables one GPU step runs on: their capacities, the blob layout the host fills, the split-K
//! plan, and the captured graphs kept with them.

use super::Scratch;
use crate::gpu::cuda::{DstArg, SegArg, SeqArg};
use cudarc::driver::CudaSlice;

/// Graphs kept per shape (batch, rows, attention split); a new shape past this many starts the cache afresh.
pub(super) const MAX_GRAPHS: usize = 32;

/// Split-K plan for attention over at most `max_total` tokens with `rows_heads` (row, head) pairs: enough
/// warps to fill the device, and (chunk, splits) in coarse steps so a decode step keeps its shape (and its
/// captured graph) for many tokens. Splits past the data write an empty partial.
pub(super) fn split_plan(max_total: usize, rows_heads: usize) -> (usize, usize) {
    // ~8k warps fill an H200 (132 SMs × 64); a Jetson needs fewer but loses little to the extra empty splits
    let want = 8192usize.div_ceil(rows_heads.max(1)).max(1);
    let chunk = if max_total <= 64 * want {
        64
    } else {
        max_total.div_ceil(want).div_ceil(512) * 512
    };
    let splits = max_total.div_ceil(chunk).max(1).div_ceil(8) * 8;
    (chunk, splits)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Capacity {
    pub(super) t: usize,
    pub(super) r: usize,
    pub(super) segs: usize,
    pub(super) seqs: usize,
    pub(super) dsts: usize,
    pub(super) work: usize,
    pub(super) half: usize,
}

impl Capacity {
    pub(super) fn holds(&self, n: &Capacity) -> bool {
        self.t >= n.t
            && self.r >= n.r
            && self.segs >= n.segs
            && self.seqs >= n.seqs
            && self.dsts >= n.dsts
            && self.work >= n.work
            && self.half >= n.half
    }
    /// Room for `n` and then some, so a growing cache does not reallocate (and re-capture) every step.
    pub(super) fn grow(&self, n: &Capacity) -> Capacity {
        let g = |a: usize, b: usize| if b <= a { a } else { b.max(a + a / 2) };
        Capacity {
            t: g(self.t, n.t),
            r: g(self.r, n.r),
            segs: g(self.segs, n.segs.max(64)),
            seqs: g(self.seqs, n.seqs),
            dsts: g(self.dsts, n.dsts),
            work: g(self.work, n.work),
            half: n.half.max(self.half),
        }
    }
}

/// Byte offsets of each table in the step blob (8-byte aligned).
pub(super) struct BlobLayout {
    pub(super) segs: usize,
    pub(super) seqs: usize,
    pub(super) dsts: usize,
    pub(super) row_seq: usize,
    pub(super) row_fresh: usize,
    pub(super) row_fresh0: usize,
    pub(super) tokens: usize,
    pub(super) cos: usize,
    pub(super) sin: usize,
    pub(super) rows: usize,
    pub(super) total: usize,
}

impl BlobLayout {
    pub(super) fn new(c: &Capacity) -> BlobLayout {
        let mut off = 0usize;
        let mut take = |bytes: usize| {
            let at = off;
            off += bytes.div_ceil(8) * 8;
            at
        };
        let segs = take(c.segs.max(1) * std::mem::size_of::<SegArg>());
        let seqs = take(c.seqs.max(1) * std::mem::size_of::<SeqArg>());
        let dsts = take(c.dsts.max(1) * std::mem::size_of::<DstArg>());
        let row_seq = take(c.t * 4);
        let row_fresh = take(c.t * 4);
        let row_fresh0 = take(c.t * 4);
        let tokens = take(c.t * 4);
        let cos = take(c.t * c.half * 4);
        let sin = take(c.t * c.half * 4);
        let rows = take(c.r.max(1) * 4);
        BlobLayout {
            segs,
            seqs,
            dsts,
            row_seq,
            row_fresh,
            row_fresh0,
            tokens,
            cos,
            sin,
            rows,
            total: off,
        }
    }
}

/// The device buffers a step runs on, kept from step to step so their addresses (baked into captured graphs)
/// stay put; replaced, graphs and all, when a step needs more room.
pub(super) struct StepBuffers {
    pub(super) scratch: Scratch,
    pub(super) blob: CudaSlice<u8>,
    pub(super) sel: CudaSlice<f32>,
    pub(super) logits: CudaSlice<f32>,
    pub(super) layout: BlobLayout,
    pub(super) cap: Capacity,
    pub(super) graphs: std::collections::HashMap<GraphKey, cudarc::driver::CudaGraph>,
    pub(super) graphs_ok: bool,
}

// SAFETY: the graphs are only touched under the model's step lock (one thread at a time), which is all CUDA
// asks of graph objects; the buffers are plain device allocations.
unsafe impl Send for StepBuffers {}

/// What a captured decode step depends on: rows, sequences, logits rows, attention chunk and splits, the
/// smallest group, whether a sequence rotates, and the launch plan (fused, query heads per attention warp).
pub(super) type GraphKey = (usize, usize, usize, usize, usize, usize, bool, bool, usize);

pub(super) struct StepPlan {
    pub(super) t: usize,
    pub(super) ns: usize,
    pub(super) r: usize,
    pub(super) chunk: usize,
    pub(super) splits: usize,
    pub(super) g_min: usize,
    /// Some sequence's cache rotates its inputs (before attention, and back on its output).
    pub(super) rotate: bool,
    /// The launch plan: RoPE + rotation + store, merge + inverse rotation + 8-bit blocks, and (decode steps) norm
    /// or SwiGLU + matmul fused (10 launches per layer, 7 in a decode step), or each its own launch (as the
    /// 2026-11-30 H200 run measured); query heads per attention warp.
    pub(super) fused: bool,
    pub(super) gqa: usize,
}

/// The bytes of a slice of plain `#[repr(C)]` values (the tables copied to the device).
pub(super) fn as_bytes<T: Copy>(v: &[T]) -> &[u8] {
    // SAFETY: `T` is one of the table types (integers, floats, `#[repr(C)]` structs of them with no padding
    // holes read by the device as anything but the same types); the slice is valid for its byte length.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::cuda::OutArg;
    use std::mem::{offset_of, size_of};

    /// Field names of `struct NAME { … };` in kernels/forward.cu, in order.
    fn cuda_fields(name: &str) -> Vec<String> {
        let src = include_str!("../../../kernels/forward.cu");
        let start = src.find(&format!("struct {name} {{")).expect("struct in forward.cu");
        let body = &src[start..];
        let body = &body[body.find('{').unwrap() + 1..body.find("};").unwrap()];
        body.lines()
            .map(|l| l.split("//").next().unwrap())
            .flat_map(|l| l.split(';'))
            .filter_map(|decl| {
                let decl = decl.trim();
                let (_, names) = decl.split_once(' ')?;
                Some(
                    names
                        .split(',')
                        .map(|n| n.trim().split('[').next().unwrap().to_string())
                        .collect::<Vec<_>>(),
                )
            })
            .flatten()
            .filter(|n| !n.is_empty())
            .collect()
    }

    #[test]
    fn table_structs_match_the_kernels_field_for_field() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            cuda_fields("pk_seg"),
            names(&["k_data", "k_scale", "k_off", "v_data", "v_scale", "v_off", "len", "bits", "start", "pad"])
        );
        assert_eq!(
            cuda_fields("pk_seq"),
            names(&["seg_start", "seg_count", "stored", "g", "qscale", "kinv", "signs"])
        );
        assert_eq!(
            cuda_fields("pk_dst"),
            names(&["k_data", "k_scale", "k_off", "v_data", "v_scale", "v_off", "kinv", "bits", "g"])
        );
        assert_eq!(
            cuda_fields("pk_out"),
            names(&["ptr", "ld", "start", "parts", "accumulate"])
        );
        // C layout of those fields (8-byte pointers, 4-byte ints, no hidden padding the host would leave unset)
        assert_eq!(
            (
                size_of::<SegArg>(),
                offset_of!(SegArg, len),
                offset_of!(SegArg, bits),
                offset_of!(SegArg, start)
            ),
            (64, 48, 52, 56)
        );
        assert_eq!(
            (
                size_of::<SeqArg>(),
                offset_of!(SeqArg, g),
                offset_of!(SeqArg, qscale),
                offset_of!(SeqArg, signs)
            ),
            (40, 12, 16, 32)
        );
        assert_eq!(
            (size_of::<DstArg>(), offset_of!(DstArg, kinv), offset_of!(DstArg, g)),
            (64, 48, 60)
        );
        assert_eq!(
            (
                size_of::<OutArg>(),
                offset_of!(OutArg, ld),
                offset_of!(OutArg, start),
                offset_of!(OutArg, parts),
                offset_of!(OutArg, accumulate)
            ),
            (64, 24, 36, 52, 56)
        );
    }

    #[test]
    fn split_plan_covers_every_token_in_coarse_steps() {
        for rows_heads in [9, 27, 72, 288, 4608] {
            let mut shapes = std::collections::BTreeSet::new();
            for max_total in (1..70_000).step_by(7) {
                let (chunk, splits) = split_plan(max_total, rows_heads);
                assert!(
                    chunk * splits >= max_total,
                    "{max_total} tokens, {rows_heads}: {chunk}×{splits}"
                );
                assert!(splits.is_multiple_of(8) && chunk.is_multiple_of(32) && chunk >= 64);
                // no more than one split past the data rounds up to the next multiple of 8
                assert!((splits - 8) * chunk < max_total || splits == 8);
                shapes.insert((chunk, splits));
            }
            // a decode step keeps its graph for many tokens: few distinct shapes over 70k tokens
            assert!(shapes.len() <= 200, "{rows_heads}: {} shapes", shapes.len());
        }
        // one decode row of 9 heads at 32k tokens: enough warps to fill an H200
        let (_, splits) = split_plan(32_768, 9);
        assert!(9 * splits >= 4096);
    }

    #[test]
    fn blob_sections_are_aligned_in_order_and_disjoint() {
        let cap = Capacity {
            t: 7,
            r: 3,
            segs: 101,
            seqs: 30,
            dsts: 210,
            work: 1,
            half: 32,
        };
        let l = BlobLayout::new(&cap);
        let sections = [
            (l.segs, cap.segs * size_of::<SegArg>()),
            (l.seqs, cap.seqs * size_of::<SeqArg>()),
            (l.dsts, cap.dsts * size_of::<DstArg>()),
            (l.row_seq, cap.t * 4),
            (l.row_fresh, cap.t * 4),
            (l.row_fresh0, cap.t * 4),
            (l.tokens, cap.t * 4),
            (l.cos, cap.t * cap.half * 4),
            (l.sin, cap.t * cap.half * 4),
            (l.rows, cap.r * 4),
        ];
        let mut end = 0;
        for (off, len) in sections {
            assert!(
                off.is_multiple_of(8) && off >= end,
                "section at {off} overlaps the one ending at {end}"
            );
            end = off + len;
        }
        assert!(l.total >= end);
    }

    #[test]
    fn capacity_grows_past_what_a_step_needs_and_never_shrinks() {
        let small = Capacity {
            t: 1,
            r: 1,
            segs: 64,
            seqs: 30,
            dsts: 30,
            work: 100,
            half: 32,
        };
        let need = Capacity {
            t: 4,
            segs: 65,
            work: 90,
            ..small
        };
        assert!(!small.holds(&need));
        let g = small.grow(&need);
        assert!(g.holds(&need) && g.holds(&small));
        assert_eq!((g.t, g.work), (4, 100));
        assert!(g.segs >= 96, "grows by half at least: {}", g.segs);
    }
}
