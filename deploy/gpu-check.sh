#!/usr/bin/env bash
# GPU verification of kernels/*.cu: compile the harness for this GPU with nvcc, check every kernel against
# reference vectors computed by the CPU specification, time decode attention at 32k context, write a report.
#
#   cargo run --release --example gpu_vectors -- gpu-bundle/vectors   # on any machine (no GPU needed)
#   deploy/gpu-check.sh [VECTOR_DIR] [REPORT_DIR]                      # on the GPU machine (CUDA toolkit)
#
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
