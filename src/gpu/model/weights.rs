//! The model's weights on the device: each matrix in its GGUF blocks (or f16 when the type has no kernel).

use super::{gerr, Gpu};
use crate::model::linear::{Linear, WeightData};
use crate::model::{ModelError, Projection};
use cudarc::driver::CudaSlice;
use half::f16;

/// Weight storage codes of `forward.cu` (PK_F32 …).
pub(super) const F32: i32 = 0;
pub(super) const F16: i32 = 1;

pub(super) struct DevLinear {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) fmt: i32,
    pub(super) w: CudaSlice<u8>,
    pub(super) bias: Option<CudaSlice<f32>>,
}

/// Weights of a type without a device kernel (K-quants and others): dequantized to f16 once, at load.
fn as_f16(name: &str, v: &[f32]) -> (i32, Vec<u8>) {
    tracing::info!(
        tensor = name,
        "no GPU kernel for this weight type: dequantized to f16 at load"
    );
    (F16, v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect())
}

impl DevLinear {
    /// In GGUF blocks (what `pk_matmul_qa` takes) and over few enough inputs for its shared memory.
    pub(super) fn own_blocks(&self) -> bool {
        self.fmt >= 2 && super::launch::own_blocks_fit(self.cols)
    }

    pub(super) fn upload(gpu: &Gpu, l: &Linear, name: &str) -> Result<DevLinear, ModelError> {
        use crate::cpu::BlockFormat;
        let (fmt, bytes): (i32, Vec<u8>) = match &l.data {
            WeightData::Blocks { .. } | WeightData::Panels { .. } => {
                let (format, bytes) = l.gguf_blocks().expect("block weights");
                match format {
                    BlockFormat::Q4_0 => (2, bytes.into_owned()),
                    BlockFormat::Q4_1 => (3, bytes.into_owned()),
                    BlockFormat::Q8_0 => (4, bytes.into_owned()),
                    // no Q5_0 device kernel: the same values as Q8_0 blocks
                    BlockFormat::Q5_0 => (4, crate::cpu::q5_0_to_q8_0(&bytes)),
                    // our regrouped Q6_K: no device kernel, f16 as for the other K-quants
                    BlockFormat::Q6K32 => {
                        let mut v = vec![0f32; l.rows * l.cols];
                        crate::cpu::dequantize_row(format, &bytes, &mut v);
                        as_f16(name, &v)
                    }
                }
            }
            WeightData::F32(v) => (F32, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            WeightData::F16(v) => (F16, v.iter().flat_map(|x| x.to_le_bytes()).collect()),
            WeightData::Candle(mm) => {
                use candle_core::quantized::QMatMul;
                use candle_core::{DType, Device};
                let t = match mm {
                    QMatMul::QTensor(q) => q.dequantize(&Device::Cpu)?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(DType::F32)?,
                };
                as_f16(name, &t.flatten_all()?.to_vec1::<f32>()?)
            }
        };
        Ok(DevLinear {
            rows: l.rows,
            cols: l.cols,
            fmt,
            w: gpu.upload(&bytes).map_err(gerr)?,
            bias: match &l.bias {
                Some(b) => Some(gpu.upload(b).map_err(gerr)?),
                None => None,
            },
        })
    }
    pub(super) fn bytes(&self) -> usize {
        self.w.len() + self.bias.as_ref().map_or(0, |b| b.len() * 4)
    }
}

pub(super) enum DevProj {
    /// One matrix whose rows are the parts, stacked.
    Fused(DevLinear),
    Split(Vec<DevLinear>),
}

impl DevProj {
    /// Every part can make its own 8-bit activation blocks ([`DevLinear::own_blocks`]).
    pub(super) fn own_blocks(&self) -> bool {
        match self {
            DevProj::Fused(l) => l.own_blocks(),
            DevProj::Split(parts) => parts.iter().all(DevLinear::own_blocks),
        }
    }

    pub(super) fn upload(gpu: &Gpu, p: &Projection, name: &str) -> Result<DevProj, ModelError> {
        Ok(match p {
            Projection::Fused { linear, .. } => DevProj::Fused(DevLinear::upload(gpu, linear, name)?),
            Projection::Split(parts) => DevProj::Split(
                parts
                    .iter()
                    .map(|l| DevLinear::upload(gpu, l, name))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
    pub(super) fn bytes(&self) -> usize {
        match self {
            DevProj::Fused(l) => l.bytes(),
            DevProj::Split(p) => p.iter().map(DevLinear::bytes).sum(),
        }
    }
}

pub(super) struct DevLayer {
    pub(super) attn_norm: CudaSlice<f32>,
    pub(super) qkv: DevProj,
    pub(super) o: DevLinear,
    pub(super) ffn_norm: CudaSlice<f32>,
    pub(super) gate_up: DevProj,
    pub(super) down: DevLinear,
}
