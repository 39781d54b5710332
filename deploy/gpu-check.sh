#!/usr/bin/env bash
# GPU verification of kernels/*.cu: compile the harness for this GPU with nvcc, check every kernel against
# reference vectors computed by the CPU specification, time decode attention at 32k context, write a report.
#
#   cargo run --release --example gpu_vectors -- gpu-bundle/vectors   # on any machine (no GPU needed)
#   cp "$(cargo test --release --features cuda-kernels --test gpu_kernels --no-run 2>&1 \
#        | grep -o '/[^ )]*gpu_kernels-[0-9a-f]*')" gpu-bundle/gpu_kernels   # the Rust-side GPU tests, prebuilt
#   deploy/gpu-check.sh [VECTOR_DIR] [REPORT_DIR]                      # on the GPU machine (CUDA toolkit)
#
# Then also runs the Rust launch wrappers' GPU tests (cudarc + NVRTC at run time): the prebuilt binary if
# gpu-bundle/gpu_kernels exists, else `cargo test --features cuda-kernels` if cargo is there.
# Takes well under a minute on one GPU (nvcc ~20 s, checks and timings a few seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
vectors=${1:-gpu-bundle/vectors}
report=${2:-${OUT:-gpu-report}}
mkdir -p "$report"
if [[ ! -f $vectors/attn.bin ]]; then
  command -v cargo >/dev/null || { echo "gpu-check: no vectors in $vectors and no cargo to make them" >&2; exit 66; }
  cargo run --release --example gpu_vectors -- "$vectors"
fi
command -v nvcc >/dev/null || { echo "gpu-check: nvcc (CUDA toolkit) not found" >&2; exit 69; }
cc=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
{
  echo "nvcc: $(nvcc --version | tail -1)"
  echo "driver: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
} | tee "$report/gpu-env.txt"
nvcc -O3 -std=c++17 -arch="sm_$cc" -o /tmp/pmkvq-check kernels/harness/check.cu
/tmp/pmkvq-check "$vectors" | tee "$report/gpu-check.md"
# The Rust side: kernels compiled by NVRTC at run time, launched through cudarc, compared with the CPU code.
# cudarc asks for libnvrtc.so (or .so.12): point it at the toolkit's, whatever its version suffix.
nvrtc=$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnvrtc.so*' ! -name '*builtins*' 2>/dev/null | head -1 || true)
if [[ -n $nvrtc ]]; then
  mkdir -p /tmp/pmkvq-nvrtc && ln -sf "$nvrtc" /tmp/pmkvq-nvrtc/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/pmkvq-nvrtc:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
if [[ -x gpu-bundle/gpu_kernels ]]; then
  gpu-bundle/gpu_kernels --include-ignored --test-threads 1 2>&1 | tee "$report/rust-gpu-tests.txt"
elif command -v cargo >/dev/null; then
  cargo test --release --features cuda-kernels --test gpu_kernels -- --include-ignored --test-threads 1 2>&1 \
    | tee "$report/rust-gpu-tests.txt"
else
  echo "gpu-check: no prebuilt gpu-bundle/gpu_kernels and no cargo: Rust-side GPU tests not run" | tee "$report/rust-gpu-tests.txt"
  exit 1
fi
