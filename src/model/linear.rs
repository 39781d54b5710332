//! A weight matrix and its matmul: `out[t][r] = Σ_k W[r][k]·x[t][k] (+ bias[r])`.
//!
//! Native kernels run the block formats in place (no re-quantization, so a Q4_1 file decodes from ~0.6 bytes
//! per weight); other GGUF types go through candle's `QMatMul`. Rows are split across the model's worker pool.

use super::ModelError;
use crate::cpu::panel::{self, Q8Panel, PANEL_ROWS};
use crate::cpu::{kernels, BlockFormat, Kernels, Q8Row, QK};
use half::f16;
use rayon::prelude::*;
use std::borrow::Cow;

pub enum WeightData {
    /// GGUF blocks, row-major: each row is `cols/32` blocks.
    Blocks {
        format: BlockFormat,
        bytes: Vec<u8>,
    },
    /// The same blocks laid out in panels of 16 rows (`cpu::panel`): the layout the CPU's panel kernel reads,
    /// chosen at load where that kernel exists. Same size as `Blocks`; each panel starts where its first row did.
    Panels {
        format: BlockFormat,
        bytes: Vec<u8>,
    },
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Any other type candle can multiply (K-quants, IQ-quants, ...).
    Candle(candle_core::quantized::QMatMul),
}

pub struct Linear {
    pub rows: usize,
    pub cols: usize,
    pub data: WeightData,
    pub bias: Option<Vec<f32>>,
}

/// Below this many multiply-adds a matmul runs on the calling thread: handing it to the pool costs more.
const PARALLEL_MIN_MACS: usize = 1 << 16;
/// Below this many values, quantizing the activations and reordering the output stay on the calling thread
/// (a few microseconds: a fork-join on the pool costs as much, and a decode step has hundreds of them).
const PARALLEL_MIN_VALUES: usize = 1 << 15;

impl Linear {
    pub fn row_bytes(&self) -> usize {
        match &self.data {
            WeightData::Blocks { format, .. } | WeightData::Panels { format, .. } => {
                self.cols / QK * format.block_bytes()
            }
            _ => 0,
        }
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.data {
            WeightData::Blocks { bytes, .. } | WeightData::Panels { bytes, .. } => bytes.len(),
            WeightData::F32(v) => v.len() * 4,
            WeightData::F16(v) => v.len() * 2,
            WeightData::Candle(_) => 0,
        }
    }

    /// Lay block weights out for `k`'s batched kernel (the panel layout) when it has one; anything else is
    /// returned unchanged.
    pub fn for_kernels(self, k: &Kernels) -> Linear {
        if k.panel_dot.is_none() {
            return self.q5_0_widened();
        }
        self.into_panels()
    }

    /// Q5_0 blocks rewritten as Q8_0 blocks with the same values (34 bytes per 32 weights instead of 22), for
    /// CPUs whose row kernels have no Q5_0 path (AVX2 without AVX-512, NEON, scalar); anything else unchanged.
    pub fn q5_0_widened(mut self) -> Linear {
        if let WeightData::Blocks {
            format: BlockFormat::Q5_0,
            bytes,
        } = &self.data
        {
            self.data = WeightData::Blocks {
                format: BlockFormat::Q8_0,
                bytes: crate::cpu::q5_0_to_q8_0(bytes),
            };
        }
        self
    }

    /// Block weights in the panel layout (a CPU without a panel kernel runs them with the scalar one).
    pub fn into_panels(mut self) -> Linear {
        if self.rows == 0 {
            return self;
        }
        if let WeightData::Blocks { format, bytes } = self.data {
            let bytes = panel::interleave(format, self.rows, &bytes);
            self.data = WeightData::Panels { format, bytes };
        }
        self
    }

    /// Block weights in GGUF's own layout (what the GPU kernels read), with their format; `None` for other
    /// storage.
    pub fn gguf_blocks(&self) -> Option<(BlockFormat, Cow<'_, [u8]>)> {
        match &self.data {
            WeightData::Blocks { format, bytes } => Some((*format, Cow::Borrowed(bytes))),
            WeightData::Panels { format, bytes } => {
                Some((*format, Cow::Owned(panel::deinterleave(*format, self.rows, bytes))))
            }
            _ => None,
        }
    }

    /// `x` is `t × cols` row-major; returns `t × rows`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>, ModelError> {
        debug_assert_eq!(x.len(), t * self.cols);
        let rows = self.rows;
        let parallel = rayon::current_num_threads() > 1 && rows * self.cols * t >= PARALLEL_MIN_MACS;
        let par_in = parallel && t * self.cols >= PARALLEL_MIN_VALUES;
        let par_out = parallel && t * rows >= PARALLEL_MIN_VALUES;
        // Work on the transposed output (row-major over weight rows) so tasks own contiguous chunks.
        let mut out_t = vec![0.0f32; rows * t];
        let k = kernels();
        let chunk_rows = (rows / (rayon::current_num_threads() * 4)).clamp(8, 256);
        match &self.data {
            WeightData::Blocks { format, bytes } => {
                let rb = self.row_bytes();
                let quantize = |xr: &[f32]| {
                    let mut q = Q8Row::default();
                    (k.quantize_q8)(xr, &mut q);
                    q
                };
                let xq: Vec<Q8Row> = if par_in {
                    x.par_chunks_exact(self.cols).map(quantize).collect()
                } else {
                    x.chunks_exact(self.cols).map(quantize).collect()
                };
                let body = |(ci, chunk): (usize, &mut [f32])| {
                    for (j, o) in chunk.chunks_exact_mut(t).enumerate() {
                        let r = ci * chunk_rows + j;
                        let row = &bytes[r * rb..(r + 1) * rb];
                        let mut ti = 0;
                        while ti + 4 <= t {
                            let r4 = format.dot4(k, row, [&xq[ti], &xq[ti + 1], &xq[ti + 2], &xq[ti + 3]]);
                            o[ti..ti + 4].copy_from_slice(&r4);
                            ti += 4;
                        }
                        for (o, q) in o[ti..].iter_mut().zip(&xq[ti..]) {
                            *o = format.dot(k, row, q);
                        }
                    }
                };
                if parallel {
                    out_t.par_chunks_mut(chunk_rows * t).enumerate().for_each(body);
                } else {
                    out_t.chunks_mut(chunk_rows * t).enumerate().for_each(body);
                }
            }
            WeightData::Panels { format, bytes } => {
                let rb = self.row_bytes();
                let dot = k.panel_dot.unwrap_or(panel::dot_rows);
                let prepare = |xr: &[f32]| {
                    let mut q = Q8Row::default();
                    (k.quantize_q8)(xr, &mut q);
                    Q8Panel::new(q, *format)
                };
                let xp: Vec<Q8Panel> = if par_in {
                    x.par_chunks_exact(self.cols).map(prepare).collect()
                } else {
                    x.chunks_exact(self.cols).map(prepare).collect()
                };
                // out_t holds panel p's results at p·16·t as [activation row][row in panel]
                let per_task = (rows.div_ceil(PANEL_ROWS) / (rayon::current_num_threads() * 4)).clamp(1, 16);
                let body = |(ti, chunk): (usize, &mut [f32])| {
                    let r0 = ti * per_task * PANEL_ROWS;
                    for (pi, o) in chunk.chunks_mut(PANEL_ROWS * t).enumerate() {
                        let (p0, h) = (r0 + pi * PANEL_ROWS, o.len() / t);
                        dot(*format, &bytes[p0 * rb..(p0 + h) * rb], h, &xp, o);
                    }
                };
                if parallel {
                    out_t
                        .par_chunks_mut(per_task * PANEL_ROWS * t)
                        .enumerate()
                        .for_each(body);
                } else {
                    out_t.chunks_mut(per_task * PANEL_ROWS * t).enumerate().for_each(body);
                }
                let mut out = if t == 1 {
                    out_t
                } else {
                    let mut o = vec![0.0f32; rows * t];
                    // activation row ti's results: h contiguous floats per panel
                    let scatter = |(ti, orow): (usize, &mut [f32])| {
                        for (p0, h) in panel::panels(rows) {
                            let from = p0 * t + ti * h;
                            orow[p0..p0 + h].copy_from_slice(&out_t[from..from + h]);
                        }
                    };
                    if par_out {
                        o.par_chunks_mut(rows).enumerate().for_each(scatter);
                    } else {
                        o.chunks_mut(rows).enumerate().for_each(scatter);
                    }
                    o
                };
                self.add_bias(&mut out, t);
                return Ok(out);
            }
            WeightData::F32(w) => {
                let cols = self.cols;
                let body = |(ci, chunk): (usize, &mut [f32])| {
                    for (j, o) in chunk.chunks_exact_mut(t).enumerate() {
                        let r = ci * chunk_rows + j;
                        let row = &w[r * cols..(r + 1) * cols];
                        for (ti, xr) in x.chunks_exact(cols).enumerate() {
                            o[ti] = (k.dot_f32)(row, xr);
                        }
                    }
                };
                if parallel {
                    out_t.par_chunks_mut(chunk_rows * t).enumerate().for_each(body);
                } else {
                    out_t.chunks_mut(chunk_rows * t).enumerate().for_each(body);
                }
            }
            WeightData::F16(w) => {
                let cols = self.cols;
                let body = |(ci, chunk): (usize, &mut [f32])| {
                    for (j, o) in chunk.chunks_exact_mut(t).enumerate() {
                        let r = ci * chunk_rows + j;
                        let row = &w[r * cols..(r + 1) * cols];
                        for (ti, xr) in x.chunks_exact(cols).enumerate() {
                            o[ti] = (k.dot_f16)(row, xr);
                        }
                    }
                };
                if parallel {
                    out_t.par_chunks_mut(chunk_rows * t).enumerate().for_each(body);
                } else {
                    out_t.chunks_mut(chunk_rows * t).enumerate().for_each(body);
                }
            }
            WeightData::Candle(mm) => {
                use candle_core::{Device, Module, Tensor};
                let xs = Tensor::from_slice(x, (t, self.cols), &Device::Cpu)?;
                let mut out = mm.forward(&xs)?.flatten_all()?.to_vec1::<f32>()?;
                self.add_bias(&mut out, t);
                return Ok(out);
            }
        }
        let mut out = if t == 1 {
            out_t
        } else {
            let mut o = vec![0.0f32; rows * t];
            let transpose = |(ti, orow): (usize, &mut [f32])| {
                for (r, v) in orow.iter_mut().enumerate() {
                    *v = out_t[r * t + ti];
                }
            };
            if par_out {
                o.par_chunks_mut(rows).enumerate().for_each(transpose);
            } else {
                o.chunks_mut(rows).enumerate().for_each(transpose);
            }
            o
        };
        self.add_bias(&mut out, t);
        Ok(out)
    }

    fn add_bias(&self, out: &mut [f32], t: usize) {
        if let Some(b) = &self.bias {
            for row in out.chunks_exact_mut(self.rows).take(t) {
                for (o, bv) in row.iter_mut().zip(b) {
                    *o += bv;
                }
            }
        }
    }

    /// Stack matrices that read the same input (q/k/v, gate/up) into one, so one pass over the activations
    /// and one hand-off to the pool serve all of them. Returns the parts unchanged when their storage differs.
    pub fn concat_rows(parts: Vec<Linear>) -> Result<Linear, Vec<Linear>> {
        let same = parts.windows(2).all(|w| {
            w[0].cols == w[1].cols
                && match (&w[0].data, &w[1].data) {
                    (WeightData::Blocks { format: a, .. }, WeightData::Blocks { format: b, .. }) => a == b,
                    (WeightData::F32(_), WeightData::F32(_)) | (WeightData::F16(_), WeightData::F16(_)) => true,
                    _ => false,
                }
        });
        if !same || parts.is_empty() {
            return Err(parts);
        }
        let cols = parts[0].cols;
        let rows = parts.iter().map(|p| p.rows).sum();
        let any_bias = parts.iter().any(|p| p.bias.is_some());
        let bias = any_bias.then(|| {
            parts
                .iter()
                .flat_map(|p| p.bias.clone().unwrap_or_else(|| vec![0.0; p.rows]))
                .collect::<Vec<f32>>()
        });
        let mut it = parts.into_iter();
        let first = it.next().expect("non-empty");
        let mut data = first.data;
        for p in it {
            match (&mut data, p.data) {
                (WeightData::Blocks { bytes, .. }, WeightData::Blocks { bytes: b, .. }) => bytes.extend(b),
                (WeightData::F32(v), WeightData::F32(b)) => v.extend(b),
                (WeightData::F16(v), WeightData::F16(b)) => v.extend(b),
                _ => unreachable!("checked above"),
            }
        }
        Ok(Linear { rows, cols, data, bias })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }

    fn random(format: BlockFormat, rows: usize, cols: usize, seed: &mut u64) -> Linear {
        let mut bytes = Vec::new();
        for _ in 0..rows * cols / QK {
            bytes.extend_from_slice(&f16::from_f32(lcg(seed).abs() * 0.1 + 0.01).to_le_bytes());
            if matches!(format, BlockFormat::Q4_1 | BlockFormat::Q6K32) {
                bytes.extend_from_slice(&f16::from_f32(lcg(seed) * 0.5).to_le_bytes());
            }
            let codes = match format {
                BlockFormat::Q8_0 => 32,
                BlockFormat::Q5_0 => 20,
                BlockFormat::Q6K32 => 24,
                _ => 16,
            };
            bytes.extend((0..codes).map(|_| (lcg(seed) * 127.0) as i8 as u8));
        }
        Linear {
            rows,
            cols,
            data: WeightData::Blocks { format, bytes },
            bias: None,
        }
    }

    /// A matmul over panels (this CPU's panel kernel, or the scalar one) gives the row kernels' results (to
    /// rounding), for one and many activation rows, also after stacking matrices whose row counts leave partial
    /// panels; the GGUF bytes come back intact.
    #[test]
    fn panel_matmuls_match_row_matmuls() {
        let mut seed = 5;
        for format in BlockFormat::ALL {
            let parts: Vec<Linear> = [21usize, 16, 3]
                .iter()
                .map(|&r| random(format, r, 576, &mut seed))
                .collect();
            let rows_ref = Linear::concat_rows(parts.iter().map(clone_blocks).collect())
                .ok()
                .unwrap();
            // stacked as GGUF rows, then laid out, as the loader does: panels straddle the parts' boundaries
            let panels = Linear::concat_rows(parts).ok().unwrap().into_panels();
            assert!(matches!(panels.data, WeightData::Panels { .. }));
            let (WeightData::Blocks { bytes: want, .. }, Some((_, got))) = (&rows_ref.data, panels.gguf_blocks())
            else {
                panic!("layouts")
            };
            assert_eq!(&got[..], &want[..]);
            for t in [1usize, 5, 12] {
                let x: Vec<f32> = (0..t * 576).map(|_| lcg(&mut seed) * 2.0).collect();
                let a = rows_ref.forward(&x, t).unwrap();
                let b = panels.forward(&x, t).unwrap();
                for (n, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * a.abs().max(1.0),
                        "{format:?} t {t} out {n}: {a} vs {b}"
                    );
                }
            }
        }
    }

    fn clone_blocks(l: &Linear) -> Linear {
        let WeightData::Blocks { format, bytes } = &l.data else {
            panic!("blocks")
        };
        Linear {
            rows: l.rows,
            cols: l.cols,
            data: WeightData::Blocks {
                format: *format,
                bytes: bytes.clone(),
            },
            bias: None,
        }
    }
}
