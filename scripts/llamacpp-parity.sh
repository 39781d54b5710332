#!/usr/bin/env bash
# Regenerate tests/golden/llamacpp-tiny.json: llama.cpp's logits for the tiny llama / qwen2 / qwen3 models of
# tests/common/tiny.rs::parity_specs (written by `cargo run --example tiny_models`). llama-cpp-python 0.3.36 (the
# version ../shared/golden was made with) is built once into $PMKVQ_LLAMAPY_VENV (~/.cache/pmkvq-llamapy).
# Run it after changing the tiny models' writer; tests/llamacpp_parity.rs says so when the files' hashes differ.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
venv=${PMKVQ_LLAMAPY_VENV:-$HOME/.cache/pmkvq-llamapy}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/python" -c "import llama_cpp" 2>/dev/null \
  || CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" "$venv/bin/pip" install -q "llama-cpp-python==0.3.36" numpy
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
mapfile -t models < <(cargo run --release --quiet --example tiny_models -- "$dir")
"$venv/bin/python" scripts/llamacpp-parity.py tests/golden/llamacpp-tiny.json "${models[@]}"
