#!/usr/bin/env bash
# The divergence tables and plots in docs/ (issue 3): the default model on a 4096-token reasoning trace it
# writes itself from AIME 2024 I problem 1, every method at equal true-byte budgets (1/4 and 1/5 of the f16
# bytes, and the smallest budget PM-KVQ can hold the trace in), plus the cross-check with llama.cpp's q4_0
# KL on botchan.txt (2048-token chunks, second half of each scored). ~30 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
deploy/fetch-model.sh models >/dev/null
cargo build --release --bin pmkvq
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
mkdir -p docs
problem="$(cat ../shared/data/math/aime_2024_I/problems/1.tex)
Please reason step by step, and put your final answer within \\boxed{}."
"$pmkvq" eval divergence --chat "$problem" --tokens 4096 --threads 2 \
  --methods "fp16,progressive@1/4,progressive@1/5,progressive@min,pmkvq:direct@1/4,kivi:2@1/4,kivi:4@1/4,rtn:2@1/5,rtn:4@1/4,q4_0@1/4" \
  --greedy-tokens 128 --title "SmolLM2-135M, 4096-token AIME trace" \
  --plot docs/divergence-trace.svg --markdown docs/divergence-trace.md --json > docs/divergence-trace.json
"$pmkvq" eval divergence --text-file ../shared/data/text/botchan.txt --tokens 8192 --chunk-len 2048 --threads 2 \
  --methods "fp16,q8_0,q4_0,rtn:4,kivi:4,progressive@1/4" --greedy-tokens 0 --title "SmolLM2-135M, botchan.txt, 2048-token chunks" \
  --plot docs/divergence-botchan.svg --markdown docs/divergence-botchan.md --json > docs/divergence-botchan.json
cat docs/divergence-trace.md docs/divergence-botchan.md
