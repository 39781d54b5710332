//! A weight matrix and its matmul: `out[t][r] = Σ_k W[r][k]·x[t][k] (+ bias[r])`.
//!
//! Native kernels run the block formats in place (no re-quantization, so a Q4_1 file decodes from ~0.6 bytes
//! per weight); other GGUF types go through candle's `QMatMul`. Rows are split across the model's worker pool.

use super::ModelError;
use crate::cpu::{kernels, BlockFormat, Q8Row, QK};
use half::f16;
use rayon::prelude::*;

pub enum WeightData {
    /// GGUF blocks, row-major: each row is `cols/32` blocks.
    Blocks {
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

impl Linear {
    pub fn row_bytes(&self) -> usize {
        match &self.data {
            WeightData::Blocks { format, .. } => self.cols / QK * format.block_bytes(),
            _ => 0,
        }
    }

    /// Bytes the weights occupy in memory.
    pub fn weight_bytes(&self) -> usize {
        match &self.data {
            WeightData::Blocks { bytes, .. } => bytes.len(),
            WeightData::F32(v) => v.len() * 4,
            WeightData::F16(v) => v.len() * 2,
            WeightData::Candle(_) => 0,
        }
    }

    /// `x` is `t × cols` row-major; returns `t × rows`.
    pub fn forward(&self, x: &[f32], t: usize) -> Result<Vec<f32>, ModelError> {
        debug_assert_eq!(x.len(), t * self.cols);
        let rows = self.rows;
        let parallel = rayon::current_num_threads() > 1 && rows * self.cols * t >= PARALLEL_MIN_MACS;
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
                let xq: Vec<Q8Row> = if parallel && t > 1 {
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
            if parallel {
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
