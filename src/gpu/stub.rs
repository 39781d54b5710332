//! The GPU API without CUDA: every entry point answers `CudaNotCompiled` (candle's dummy-backend pattern, so
//! no `cfg` is needed outside this module).

use super::{GpuError, LayerSegments};
use crate::kvcache::quant::{Bits, PackedRows, ShiftMode};
use crate::kvcache::KvGeometry;
use crate::memory::{DeviceMemory, DeviceSample};
use std::sync::Arc;

/// Never constructed without CUDA.
pub struct Gpu {
    _never: std::convert::Infallible,
}

impl Gpu {
    pub fn open(ordinal: usize) -> Result<Gpu, GpuError> {
        let _ = ordinal;
        Err(GpuError::CudaNotCompiled)
    }
    pub fn name(&self) -> &str {
        match self._never {}
    }
    pub fn never<T>(&self) -> T {
        match self._never {}
    }
    pub fn arch(&self) -> &str {
        match self._never {}
    }
    pub fn mem_info(&self) -> Result<(usize, usize), GpuError> {
        match self._never {}
    }
    pub fn quantize(
        &self,
        x: &[f32],
        kv_heads: usize,
        head_dim: usize,
        g: usize,
        bits: Bits,
    ) -> Result<PackedRows, GpuError> {
        let _ = (x, kv_heads, head_dim, g, bits);
        match self._never {}
    }
    pub fn shrink(&self, rows: &PackedRows, mode: ShiftMode) -> Result<PackedRows, GpuError> {
        let _ = (rows, mode);
        match self._never {}
    }
    pub fn attention_decode(
        &self,
        g: KvGeometry,
        layer: &LayerSegments<'_>,
        q: &[f32],
        cur: Option<(&[f32], &[f32])>,
        chunk: usize,
    ) -> Result<Vec<f32>, GpuError> {
        let _ = (g, layer, q, cur, chunk);
        match self._never {}
    }
}

/// `cuMemGetInfo` as a memory sampler (never constructed without CUDA).
pub struct CudaDeviceMemory {
    pub gpu: Arc<Gpu>,
}

impl DeviceMemory for CudaDeviceMemory {
    fn sample(&mut self) -> Option<DeviceSample> {
        match self.gpu._never {}
    }
}
