//! Grouped, split attention (flash decoding): the query heads that share one KV head are computed together, so
//! each stored token's codes are read and unpacked once for all of them; and a layer's work is cut into
//! (query token × KV head × token block) tasks spread over the pool, each returning its running max, sum and
//! unnormalized output, merged exactly afterwards (log-sum-exp). One decode step's attention for one sequence thus
//! uses every core, and K and V are streamed once per step.
//!
//! The block kernels ([`GroupKernels`]) are chosen once per process like the single-head ones: AVX-512 (VNNI
//! scores over the packed codes) where the CPU has it, otherwise the single-head kernels head by head.

use super::{AttnKernels, Fresh};
use crate::cpu::Kernels;
use crate::kvcache::quant::PackedRows;
use rayon::prelude::*;

/// The query heads of one KV head, prepared once per task: f32 values, and per head and quantization group the
/// query rounded to i16 (relative error ≤ 2⁻¹⁶ of the group's largest element) with its scale and the plain sum,
/// for the integer kernels and the offset term.
pub struct GroupQuery<'a> {
    /// `heads × d` values, head-major.
    pub q: &'a [f32],
    pub heads: usize,
    pub d: usize,
    /// Score scale (1/√d).
    pub scale: f32,
    /// The quantization group the integer form was prepared for.
    pub group: usize,
    pub q16: Vec<i16>,
    /// Per (head, group): the i16 form's step.
    pub qscale: Vec<f32>,
    /// Per (head, group): Σ q.
    pub qsum: Vec<f32>,
}

impl<'a> GroupQuery<'a> {
    pub fn new(q: &'a [f32], heads: usize, d: usize, scale: f32, group: usize) -> Self {
        assert!(q.len() == heads * d && group > 0 && d.is_multiple_of(group));
        let mut q16 = vec![0i16; heads * d];
        let groups = heads * d / group;
        let (mut qscale, mut qsum) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
        for (src, dst) in q.chunks_exact(group).zip(q16.chunks_exact_mut(group)) {
            let amax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inv = if amax > 0.0 { 32767.0 / amax } else { 0.0 };
            for (d, &v) in dst.iter_mut().zip(src) {
                *d = (v * inv).round() as i16;
            }
            qscale.push(amax / 32767.0);
            qsum.push(src.iter().sum());
        }
        GroupQuery {
            q,
            heads,
            d,
            scale,
            group,
            q16,
            qscale,
            qsum,
        }
    }
    pub fn head(&self, j: usize) -> &[f32] {
        &self.q[j * self.d..(j + 1) * self.d]
    }
}

/// A run of tokens of one segment: `len` tokens from `t0`.
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub t0: usize,
    pub len: usize,
}

/// `(rows, kv head, queries, span, out, stride)`: `out[j·stride + t] = scale · q_j·x̂[t0+t]`.
pub type ScoresFn<R> = fn(&R, usize, &GroupQuery, Span, &mut [f32], usize);
/// `(rows, kv head, p, stride, span, heads, acc)`: `acc[j·d + c] += Σ_t p[j·stride + t]·x̂[t0+t][c]`.
pub type AccumulateFn<R> = fn(&R, usize, &[f32], usize, Span, usize, &mut [f32]);

/// Block kernels over one KV head's tokens for all the query heads of a [`GroupQuery`].
pub struct GroupKernels {
    pub name: &'static str,
    /// `out[j·stride + t] = scale · q_j·x̂[t0+t]` for `t < len` and every head `j`.
    pub scores: ScoresFn<PackedRows>,
    /// `acc[j·d + c] += Σ_{t<len} p[j·stride + t]·x̂[t0+t][c]` for every head `j` of `heads`.
    pub accumulate: AccumulateFn<PackedRows>,
    /// The same two over f16 rows (token-major, `kv_heads·d` values per token).
    pub scores_f16: F16ScoresFn,
    pub accumulate_f16: F16AccumulateFn,
}

/// [`ScoresFn`] over f16 rows.
pub type F16ScoresFn = for<'a> fn(&F16Rows<'a>, usize, &GroupQuery, Span, &mut [f32], usize);
/// [`AccumulateFn`] over f16 rows.
pub type F16AccumulateFn = for<'a> fn(&F16Rows<'a>, usize, &[f32], usize, Span, usize, &mut [f32]);

/// A layer's K or V held as f16 values, token-major (the fp16 reference cache).
#[derive(Clone, Copy)]
pub struct F16Rows<'a> {
    pub data: &'a [half::f16],
    pub kv_heads: usize,
    pub d: usize,
}

impl F16Rows<'_> {
    /// Head `kvh` of token `t`.
    pub fn row(&self, t: usize, kvh: usize) -> &[half::f16] {
        let at = (t * self.kv_heads + kvh) * self.d;
        &self.data[at..at + self.d]
    }
}

/// Stored tokens grouped attention reads: packed rows, or f16 rows.
pub trait Segment: Sync {
    /// Tokens held.
    fn tokens(&self) -> usize;
    /// The quantization group a [`GroupQuery`] is prepared for.
    fn group(&self) -> usize;
    fn scores(&self, k: &GroupKernels, kvh: usize, q: &GroupQuery, s: Span, out: &mut [f32], stride: usize);
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &self,
        k: &GroupKernels,
        kvh: usize,
        p: &[f32],
        stride: usize,
        s: Span,
        heads: usize,
        acc: &mut [f32],
    );
}

impl Segment for PackedRows {
    fn tokens(&self) -> usize {
        PackedRows::len(self)
    }
    fn group(&self) -> usize {
        self.group
    }
    fn scores(&self, k: &GroupKernels, kvh: usize, q: &GroupQuery, s: Span, out: &mut [f32], stride: usize) {
        (k.scores)(self, kvh, q, s, out, stride)
    }
    fn accumulate(
        &self,
        k: &GroupKernels,
        kvh: usize,
        p: &[f32],
        stride: usize,
        s: Span,
        heads: usize,
        acc: &mut [f32],
    ) {
        (k.accumulate)(self, kvh, p, stride, s, heads, acc)
    }
}

impl Segment for F16Rows<'_> {
    fn tokens(&self) -> usize {
        self.data.len() / (self.kv_heads * self.d)
    }
    fn group(&self) -> usize {
        self.d
    }
    fn scores(&self, k: &GroupKernels, kvh: usize, q: &GroupQuery, s: Span, out: &mut [f32], stride: usize) {
        (k.scores_f16)(self, kvh, q, s, out, stride)
    }
    fn accumulate(
        &self,
        k: &GroupKernels,
        kvh: usize,
        p: &[f32],
        stride: usize,
        s: Span,
        heads: usize,
        acc: &mut [f32],
    ) {
        (k.accumulate_f16)(self, kvh, p, stride, s, heads, acc)
    }
}

/// f16 scores with `k`'s f16 dot product, head by head and token by token (the specification with the scalar
/// table, the fallback for shapes a SIMD table does not take).
pub fn scores_f16_per_token(
    k: &Kernels,
    r: &F16Rows<'_>,
    kvh: usize,
    q: &GroupQuery,
    s: Span,
    out: &mut [f32],
    stride: usize,
) {
    for j in 0..q.heads {
        for t in 0..s.len {
            out[j * stride + t] = (k.dot_f16)(r.row(s.t0 + t, kvh), q.head(j)) * q.scale;
        }
    }
}

/// f16 value accumulation with `k`'s f16 axpy, token by token.
#[allow(clippy::too_many_arguments)]
pub fn accumulate_f16_per_token(
    k: &Kernels,
    r: &F16Rows<'_>,
    kvh: usize,
    p: &[f32],
    stride: usize,
    s: Span,
    heads: usize,
    acc: &mut [f32],
) {
    let d = r.d;
    for j in 0..heads {
        for t in 0..s.len {
            (k.axpy_f16)(p[j * stride + t], r.row(s.t0 + t, kvh), &mut acc[j * d..(j + 1) * d]);
        }
    }
}

/// The grouped kernels as head-by-head calls of single-head kernels (the specification, and the fallback for
/// shapes a SIMD table does not take).
pub fn scores_per_head(
    k: &AttnKernels,
    rows: &PackedRows,
    kvh: usize,
    q: &GroupQuery,
    s: Span,
    out: &mut [f32],
    stride: usize,
) {
    for j in 0..q.heads {
        (k.scores)(
            rows,
            kvh,
            q.head(j),
            q.scale,
            s.t0,
            &mut out[j * stride..j * stride + s.len],
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub fn accumulate_per_head(
    k: &AttnKernels,
    rows: &PackedRows,
    kvh: usize,
    p: &[f32],
    stride: usize,
    s: Span,
    heads: usize,
    acc: &mut [f32],
) {
    let d = acc.len() / heads;
    for j in 0..heads {
        (k.accumulate)(
            rows,
            kvh,
            &p[j * stride..j * stride + s.len],
            s.t0,
            &mut acc[j * d..(j + 1) * d],
        );
    }
}

pub static SCALAR_GROUP: GroupKernels = GroupKernels {
    name: "scalar",
    scores: |r, h, q, s, o, st| scores_per_head(&super::SCALAR, r, h, q, s, o, st),
    accumulate: |r, h, p, st, s, n, a| accumulate_per_head(&super::SCALAR, r, h, p, st, s, n, a),
    scores_f16: |r, h, q, s, o, st| scores_f16_per_token(&crate::cpu::SCALAR, r, h, q, s, o, st),
    accumulate_f16: |r, h, p, st, s, n, a| accumulate_f16_per_token(&crate::cpu::SCALAR, r, h, p, st, s, n, a),
};

/// This CPU's single-head kernels, head by head.
pub static DETECTED_PER_HEAD: GroupKernels = GroupKernels {
    name: "per-head",
    scores: |r, h, q, s, o, st| scores_per_head(super::attn_kernels(), r, h, q, s, o, st),
    accumulate: |r, h, p, st, s, n, a| accumulate_per_head(super::attn_kernels(), r, h, p, st, s, n, a),
    scores_f16: |r, h, q, s, o, st| scores_f16_per_token(crate::cpu::kernels(), r, h, q, s, o, st),
    accumulate_f16: |r, h, p, st, s, n, a| accumulate_f16_per_token(crate::cpu::kernels(), r, h, p, st, s, n, a),
};

/// The grouped kernels for this CPU, detected on first use.
pub fn group_kernels() -> &'static GroupKernels {
    static CHOSEN: std::sync::OnceLock<&'static GroupKernels> = std::sync::OnceLock::new();
    crate::cpu::detect(
        &CHOSEN,
        &[
            #[cfg(target_arch = "x86_64")]
            (super::avx512::supported, &super::avx512::AVX512),
        ],
        &DETECTED_PER_HEAD,
    )
}

/// The arithmetic of a grouped attention call.
#[derive(Clone, Copy)]
pub struct GroupOps {
    pub kernels: &'static GroupKernels,
    pub dot_f32: fn(&[f32], &[f32]) -> f32,
    pub exp_sum: fn(&mut [f32], f32) -> f64,
}

impl GroupOps {
    pub fn detected() -> Self {
        GroupOps {
            kernels: group_kernels(),
            dot_f32: crate::cpu::kernels().dot_f32,
            exp_sum: crate::cpu::kernels().exp_sum,
        }
    }
    pub fn scalar() -> Self {
        GroupOps {
            kernels: &SCALAR_GROUP,
            dot_f32: crate::cpu::SCALAR.dot_f32,
            exp_sum: crate::cpu::SCALAR.exp_sum,
        }
    }
}

/// The shape of one layer's attention call.
#[derive(Clone, Copy, Debug)]
pub struct Heads {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub d: usize,
}

/// What query token `i` of a call sees: the first `visible` stored tokens, then `fresh` (unquantized).
pub type Visibility<'a> = (usize, Option<Fresh<'a>>);

/// Tokens per task at least (a smaller block costs more in set-up and merging than it spreads).
const MIN_BLOCK: usize = 256;
/// Tasks per pool thread aimed at, so uneven blocks and a busy core even out.
const TASKS_PER_THREAD: usize = 8;
/// Below this many score multiply-adds a call runs on the calling thread.
const PARALLEL_MIN_MACS: usize = 1 << 15;

/// One task's partial result: per head the running max, the sum of `exp(s − max)` and `Σ exp(s − max)·v`.
struct Partial {
    m: Vec<f32>,
    l: Vec<f64>,
    o: Vec<f32>,
}

/// One layer's attention for `n` query tokens (`q`: `n × q_heads × d`, `out` the same shape, overwritten) over
/// the stored segments `k`/`v` (in order) and, per token, what `see(i)` says it sees.
#[allow(clippy::too_many_arguments)]
pub fn attend_layer<'a, S: Segment + ?Sized>(
    ops: GroupOps,
    k: &[&S],
    v: &[&S],
    h: Heads,
    q: &[f32],
    n: usize,
    see: impl Fn(usize) -> Visibility<'a> + Sync,
    out: &mut [f32],
) {
    let (d, qh, kvh) = (h.d, h.q_heads, h.kv_heads);
    let group = qh / kvh;
    assert!(q.len() >= n * qh * d && out.len() >= n * qh * d);
    let total: usize = (0..n).map(|i| total_of(see(i))).sum::<usize>() * kvh;
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && total * group * d >= PARALLEL_MIN_MACS;
    let block = if parallel {
        total.div_ceil(threads * TASKS_PER_THREAD).max(MIN_BLOCK)
    } else {
        usize::MAX
    };
    // (token, kv head, block start, block end)
    // KV head outermost: consecutive tasks (and each thread's share of them) read the same head's K/V, which
    // stays in cache across a prefill chunk's query tokens
    let mut tasks = Vec::new();
    for hk in 0..kvh {
        for i in 0..n {
            let t = total_of(see(i));
            let mut a = 0;
            while a < t {
                let b = t.min(a.saturating_add(block));
                tasks.push((i, hk, a, b));
                a = b;
            }
        }
    }
    let run = |&(i, hk, a, b): &(usize, usize, usize, usize)| {
        let qv = &q[(i * qh + hk * group) * d..(i * qh + (hk + 1) * group) * d];
        block_task(ops, k, v, hk, qv, group, d, see(i), a, b)
    };
    let partials: Vec<Partial> = if parallel {
        tasks.par_iter().map(run).collect()
    } else {
        tasks.iter().map(run).collect()
    };
    out[..n * qh * d].fill(0.0);
    // merge: tasks of one (token, kv head) are adjacent
    let mut at = 0;
    while at < tasks.len() {
        let (i, hk, _, _) = tasks[at];
        let mut end = at + 1;
        while end < tasks.len() && tasks[end].0 == i && tasks[end].1 == hk {
            end += 1;
        }
        let dst = &mut out[(i * qh + hk * group) * d..(i * qh + (hk + 1) * group) * d];
        merge(&partials[at..end], group, d, dst);
        at = end;
    }
}

fn total_of(v: Visibility<'_>) -> usize {
    v.0 + v.1.map_or(0, |f| f.count)
}

/// Scores, softmax statistics and the weighted value sum for tokens `a..b` of what one query token sees, for the
/// `heads` query heads of KV head `hk`.
#[allow(clippy::too_many_arguments)]
fn block_task<S: Segment + ?Sized>(
    ops: GroupOps,
    k: &[&S],
    v: &[&S],
    hk: usize,
    q: &[f32],
    heads: usize,
    d: usize,
    (visible, fresh): Visibility<'_>,
    a: usize,
    b: usize,
) -> Partial {
    let len = b - a;
    let scale = 1.0 / (d as f32).sqrt();
    let group = k.first().map_or(d, |s| s.group());
    let gq = GroupQuery::new(q, heads, d, scale, group);
    let mut p = vec![0f32; heads * len];
    // stored tokens: the pieces of each segment that fall in a..b
    let pieces = pieces(k, visible, a, b);
    for &(si, t0, at, cnt) in &pieces {
        k[si].scores(ops.kernels, hk, &gq, Span { t0, len: cnt }, &mut p[at..], len);
    }
    let stored_end = visible.clamp(a, b);
    if let Some(f) = fresh {
        for t in stored_end..b {
            let j0 = t - visible;
            let kj = &f.k[j0 * f.stride + hk * d..j0 * f.stride + (hk + 1) * d];
            for j in 0..heads {
                p[j * len + (t - a)] = (ops.dot_f32)(gq.head(j), kj) * scale;
            }
        }
    }
    let mut m = vec![f32::NEG_INFINITY; heads];
    let mut l = vec![0f64; heads];
    for j in 0..heads {
        let row = &mut p[j * len..(j + 1) * len];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if max.is_finite() {
            l[j] = (ops.exp_sum)(row, max);
            m[j] = max;
        } else {
            row.fill(0.0);
        }
    }
    let mut o = vec![0f32; heads * d];
    for &(si, t0, at, cnt) in &pieces {
        v[si].accumulate(ops.kernels, hk, &p[at..], len, Span { t0, len: cnt }, heads, &mut o);
    }
    if let Some(f) = fresh {
        for t in stored_end..b {
            let j0 = t - visible;
            let vj = &f.v[j0 * f.stride + hk * d..j0 * f.stride + (hk + 1) * d];
            for j in 0..heads {
                let w = p[j * len + (t - a)];
                for (acc, x) in o[j * d..(j + 1) * d].iter_mut().zip(vj) {
                    *acc += w * x;
                }
            }
        }
    }
    Partial { m, l, o }
}

/// `(segment, first token in it, offset in the block, count)` for the stored tokens `a..min(b, visible)`.
fn pieces<S: Segment + ?Sized>(segs: &[&S], visible: usize, a: usize, b: usize) -> Vec<(usize, usize, usize, usize)> {
    let end = b.min(visible);
    let mut out = Vec::new();
    let mut base = 0;
    for (si, s) in segs.iter().enumerate() {
        let (lo, hi) = (base, base + s.tokens());
        let (from, to) = (a.max(lo), end.min(hi));
        if from < to {
            out.push((si, from - lo, from - a, to - from));
        }
        base = hi;
        if base >= end {
            break;
        }
    }
    out
}

/// Combine the partial results of one (query token, KV head) exactly: `out_j = Σ_b e^{m_b−M} o_b / Σ_b e^{m_b−M} l_b`.
fn merge(parts: &[Partial], heads: usize, d: usize, out: &mut [f32]) {
    for j in 0..heads {
        let mx = parts.iter().map(|p| p.m[j]).fold(f32::NEG_INFINITY, f32::max);
        if !mx.is_finite() {
            continue;
        }
        let dst = &mut out[j * d..(j + 1) * d];
        let mut sum = 0f64;
        for p in parts {
            if !p.m[j].is_finite() {
                continue;
            }
            let w = (p.m[j] - mx).exp();
            sum += w as f64 * p.l[j];
            for (o, x) in dst.iter_mut().zip(&p.o[j * d..(j + 1) * d]) {
                *o += w * x;
            }
        }
        let inv = (1.0 / sum) as f32;
        for o in dst.iter_mut() {
            *o *= inv;
        }
    }
}
