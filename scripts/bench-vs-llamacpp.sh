#!/usr/bin/env bash
# Decode/prefill throughput of pmkvq (criterion bench `decode`) next to llama.cpp's llama-bench on the same
# machine, model and thread count. Builds llama.cpp's tools once (../shared/tools/peer-llamacpp.sh, ~10 min).
#   scripts/bench-vs-llamacpp.sh [THREADS]     (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${1:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
bin=$(bash ../shared/tools/peer-llamacpp.sh)
echo "== llama.cpp (llama-bench -t $threads -p 512 -n 128 -d 0,2048)"
"$bin/llama-bench" -m "$model" -t "$threads" -p 512 -n 128 -d 0,2048 -r 3
echo "== pmkvq (cargo bench --bench decode, $threads threads)"
PMKVQ_BENCH_THREADS=$threads cargo bench --bench decode 2>&1 | grep -E '^(prefill|decode)/|thrpt'
