//! GPU backend: CUDA context, the kernel registry (kernels/*.cu compiled at run time with NVRTC for the device's
//! architecture, as cubin), and launch wrappers with their shape checks.
//!
//! Owns: every CUDA call in the crate (nothing else may call CUDA). Does not own: what runs where (the engine and
//! app decide), the kernels' arithmetic (kernels/ and its Rust specification in kvcache::quant). Invariants: with
//! feature `cuda-kernels` the real implementation in `cuda.rs` is compiled, otherwise `stub.rs` with the same API
//! returning [`GpuError::CudaNotCompiled`]; a missing driver or NVRTC library is an error, never a panic (probed
//! before cudarc touches it); shapes are checked on the host before any launch.

mod shapes;
pub use shapes::{check_attention, check_quantize, check_shrink, SegmentShape};

#[cfg(feature = "cuda-kernels")]
mod cuda;
#[cfg(feature = "cuda-kernels")]
pub use cuda::{CudaDeviceMemory, Gpu};
/// The kernels' argument structs as the host fills them (public for the layout test against the kernel source).
#[cfg(feature = "cuda-kernels")]
pub use cuda::{DstArg, OutArg, SegArg, SeqArg};
#[cfg(feature = "cuda-kernels")]
pub mod kv;
#[cfg(feature = "cuda-kernels")]
pub mod model;
#[cfg(feature = "cuda-kernels")]
pub use model::GpuModel;

#[cfg(not(feature = "cuda-kernels"))]
mod stub;
#[cfg(not(feature = "cuda-kernels"))]
pub use stub::{CudaDeviceMemory, Gpu};

use crate::kvcache::quant::PackedRows;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum GpuError {
    #[error("this build has no CUDA support (build with `--features cuda-kernels`)")]
    CudaNotCompiled,
    #[error("the CUDA driver library (libcuda) was not found")]
    NoDriver,
    #[error("the NVRTC library (libnvrtc) was not found; set LD_LIBRARY_PATH to the CUDA toolkit's lib64")]
    NoNvrtc,
    #[error("CUDA: {0}")]
    Driver(String),
    #[error("compiling {kernel} for {arch}: {log}")]
    Compile { kernel: String, arch: String, log: String },
    #[error("bad shape: {0}")]
    Shape(String),
}

/// The kernel sources, compiled into the binary; the headers are inlined (NVRTC gets no include paths).
pub const KERNELS: &[(&str, &str)] = &[
    ("kv_quant.cu", include_str!("../../kernels/kv_quant.cu")),
    ("kv_shrink.cu", include_str!("../../kernels/kv_shrink.cu")),
    ("kv_attention.cu", include_str!("../../kernels/kv_attention.cu")),
    ("forward.cu", include_str!("../../kernels/forward.cu")),
];
/// The headers the kernels include, by the name they include them by.
pub const HEADERS: &[(&str, &str)] = &[
    ("pmkvq_kv.h", include_str!("../../kernels/pmkvq_kv.h")),
    ("pmkvq_rot.h", include_str!("../../kernels/pmkvq_rot.h")),
    ("pmkvq_fit.h", include_str!("../../kernels/pmkvq_fit.h")),
];

/// A kernel's full source: each header pasted where it is included.
pub fn kernel_source(name: &str) -> Option<String> {
    let mut src = KERNELS.iter().find(|(n, _)| *n == name)?.1.to_string();
    for (h, body) in HEADERS {
        src = src.replace(&format!("#include \"{h}\""), &body.replace("#pragma once", ""));
    }
    Some(src)
}

/// One layer's cache as the attention kernel reads it: sink, body and window of K and of V.
pub struct LayerSegments<'a> {
    pub k: [&'a PackedRows; 3],
    pub v: [&'a PackedRows; 3],
}

/// Which device the daemon runs on (`device` config key: `cpu`, `auto`, `cuda:N`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    Auto,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceChoice::Cpu),
            "auto" => Ok(DeviceChoice::Auto),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceChoice::Cuda)
                .ok_or_else(|| format!("must be cpu, auto or cuda:N, got `{s}`")),
        }
    }
}

/// The model's forward pass on `gpu`: its weights uploaded once, its caches in device memory.
#[cfg(feature = "cuda-kernels")]
pub fn upload_model(
    gpu: std::sync::Arc<Gpu>,
    model: &crate::model::Model,
) -> Result<std::sync::Arc<dyn crate::model::Backend>, crate::model::ModelError> {
    let m = GpuModel::new(gpu, model)?;
    tracing::info!(
        device = crate::model::Backend::device(&m),
        weight_bytes = crate::model::Backend::device_weight_bytes(&m),
        "weights uploaded to the GPU"
    );
    Ok(std::sync::Arc::new(m))
}

/// Without CUDA there is no `Gpu` to pass.
#[cfg(not(feature = "cuda-kernels"))]
pub fn upload_model(
    gpu: std::sync::Arc<Gpu>,
    model: &crate::model::Model,
) -> Result<std::sync::Arc<dyn crate::model::Backend>, crate::model::ModelError> {
    let _ = model;
    gpu.never()
}

/// Open the chosen device: `Ok(None)` means the CPU (chosen, or `auto` without a usable GPU).
pub fn open(choice: DeviceChoice) -> Result<Option<Gpu>, GpuError> {
    match choice {
        DeviceChoice::Cpu => Ok(None),
        DeviceChoice::Cuda(n) => Gpu::open(n).map(Some),
        DeviceChoice::Auto => Ok(Gpu::open(0).ok()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_sources_inline_the_header_and_export_the_entry_points() {
        for (name, entry) in [
            ("kv_quant.cu", "pmkvq_kv_quantize"),
            ("kv_shrink.cu", "pmkvq_kv_shrink"),
            ("kv_attention.cu", "pmkvq_attn_decode"),
            ("kv_attention.cu", "pmkvq_attn_combine"),
        ] {
            let src = kernel_source(name).unwrap();
            assert!(
                !src.contains("#include"),
                "{name} still includes a file NVRTC cannot see"
            );
            assert!(
                src.contains(&format!("extern \"C\" __global__ void {entry}(")),
                "{name}: {entry}"
            );
            assert!(src.contains("PMKVQ_BITS_16"));
        }
        let fwd = kernel_source("forward.cu").unwrap();
        assert!(
            !fwd.contains("#include"),
            "forward.cu still includes a file NVRTC cannot see"
        );
        for entry in ["pk_attention", "pk_rotate", "pk_kv_store"] {
            assert!(
                fwd.contains(&format!("extern \"C\" __global__ void {entry}(")),
                "forward.cu: {entry}"
            );
        }
        assert!(fwd.contains("pmkvq_rotate_row"));
        assert!(kernel_source("nope.cu").is_none());
    }

    #[test]
    fn device_choices_parse() {
        assert_eq!("cpu".parse::<DeviceChoice>(), Ok(DeviceChoice::Cpu));
        assert_eq!("auto".parse::<DeviceChoice>(), Ok(DeviceChoice::Auto));
        assert_eq!("cuda:1".parse::<DeviceChoice>(), Ok(DeviceChoice::Cuda(1)));
        assert!("gpu".parse::<DeviceChoice>().is_err());
        assert!("cuda:x".parse::<DeviceChoice>().is_err());
    }

    #[cfg(not(feature = "cuda-kernels"))]
    #[test]
    fn without_cuda_every_call_says_so() {
        assert!(matches!(Gpu::open(0), Err(GpuError::CudaNotCompiled)));
        assert!(matches!(open(DeviceChoice::Cuda(0)), Err(GpuError::CudaNotCompiled)));
        assert!(matches!(open(DeviceChoice::Auto), Ok(None)));
        assert!(matches!(open(DeviceChoice::Cpu), Ok(None)));
    }
}
