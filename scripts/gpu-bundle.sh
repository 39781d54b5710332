#!/usr/bin/env bash
# Build what deploy/gpu-check.sh runs on a GPU machine that has no Rust and no registry: the forward-pass check
# and the kernel tests (stripped), the golden prompts and a text trace, and the default model in two halves
# (what travels to the device per call is capped; ignored files stay on a warm machine between calls).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
out=models/gpu
mkdir -p "$out"
cargo build --release --features cuda-kernels --example gpu_check
objcopy --strip-debug "$CARGO_TARGET_DIR/release/examples/gpu_check" "$out/gpu_check"
bin=$(cargo test --release --features cuda-kernels --test gpu_kernels --no-run 2>&1 | grep -o '/[^ )]*gpu_kernels-[0-9a-f]*' | head -1)
objcopy --strip-debug "$bin" "$out/gpu_kernels"
shared=${PMKVQ_SHARED:-../shared}
cp "$shared/golden/smollm2-135m-instruct-q4_1.greedy.json" "$out/golden.json"
cp "$shared/data/text/botchan.txt" "$out/trace.txt"
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -f $model ]]; then
  half=$(( $(stat -c %s "$model") / 2 ))
  head -c "$half" "$model" > "$model.part-a"
  tail -c +$((half + 1)) "$model" > "$model.part-b"
  cmp <(cat "$model.part-a" "$model.part-b") "$model"
fi
ls -la "$out" models/
