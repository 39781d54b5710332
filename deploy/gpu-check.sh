#!/usr/bin/env bash
# GPU verification on a machine with an NVIDIA GPU and its driver (no Rust, no registry needed). Prepare the
# bundle on any machine (no GPU needed):
#
#   scripts/gpu-bundle.sh            # builds models/gpu/: gpu_check, gpu_kernels (stripped), golden + trace
#   deploy/gpu-check.sh [REPORT_DIR] # on the GPU machine; REPORT_DIR defaults to $OUT or gpu-report
#
# 1. The Rust-side kernel tests (kernels compiled by NVRTC at run time, launched through cudarc, compared with
#    the CPU specification): models/gpu/gpu_kernels.
# 2. The forward pass on the GPU against the CPU path on a seeded synthetic GGUF with the default model's
#    geometry and block types (greedy tokens, teacher-forced top-1, device cache codes, budget cut, batched
#    streams, speed side by side): models/gpu/gpu_check.
# 3. The same on the real default model when models/SmolLM2-135M-Instruct.Q4_1.gguf is there (golden prompts,
#    a real text trace).
# Reports go to REPORT_DIR/*.md. Takes a few minutes on an H200.
set -uo pipefail
cd "$(dirname "$0")/.."
report=${1:-${OUT:-gpu-report}}
bundle=models/gpu
mkdir -p "$report"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader | tee "$report/gpu-env.txt"
# cudarc asks for libnvrtc.so (or .so.12): point it at whatever the machine has.
nvrtc=$(find /usr/local/cuda*/ /usr/lib /opt -name 'libnvrtc.so*' ! -name '*builtins*' 2>/dev/null | head -1 || true)
if [[ -n $nvrtc ]]; then
  mkdir -p /tmp/pmkvq-nvrtc && ln -sf "$nvrtc" /tmp/pmkvq-nvrtc/libnvrtc.so
  export LD_LIBRARY_PATH=/tmp/pmkvq-nvrtc:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
rc=0
if [[ -x $bundle/gpu_kernels ]]; then
  timeout 120 "$bundle/gpu_kernels" --include-ignored --test-threads 1 > "$report/rust-gpu-tests.txt" 2>&1 || rc=1
  tail -3 "$report/rust-gpu-tests.txt"
fi
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ ! -f $model && -f $model.part-a && -f $model.part-b ]]; then
  cat "$model.part-a" "$model.part-b" > "$model"
fi
if [[ ${PMKVQ_GPU_CHECK_REAL_ONLY:-0} != 1 ]]; then
  timeout 330 "$bundle/gpu_check" ${PMKVQ_GPU_CHECK_ARGS:-} > "$report/gpu-forward-synthetic.md" 2> "$report/gpu-forward-synthetic.log" || rc=1
  cat "$report/gpu-forward-synthetic.md"; tail -20 "$report/gpu-forward-synthetic.log"
fi
if [[ -f $model ]]; then
  timeout 240 "$bundle/gpu_check" --model "$model" --golden "$bundle/golden.json" --trace-text "$bundle/trace.txt" \
    --agreement-only > "$report/gpu-forward-smollm2.md" 2> "$report/gpu-forward-smollm2.log" || rc=1
  cat "$report/gpu-forward-smollm2.md"; tail -20 "$report/gpu-forward-smollm2.log"
fi
exit $rc
