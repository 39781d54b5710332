#!/usr/bin/env bash
# Issue 4's ablation at equal true bytes (1/5 of the f16 bytes of a 4096-token trace): progressive alone,
# + calibrated allocation, + key reparameterization calibrated without positional interpolation, + with it
# (s = 4), and KIVI-2 for reference. Calibrates twice first (with and without PI). ~35 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvq
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
mkdir -p profiles docs
/usr/bin/time -f "calibration (PI, s=4): %e s wall, %M KiB peak RSS" \
  "$pmkvq" calibrate --model "$model" --data ../shared/data --threads 2 --out profiles/default.profile.json \
  > docs/calibration-table.md
/usr/bin/time -f "calibration (no PI): %e s wall, %M KiB peak RSS" \
  "$pmkvq" calibrate --model "$model" --data ../shared/data --threads 2 --effective-len 512 \
  --out profiles/default-nopi.profile.json > /dev/null
problem="$(cat ../shared/data/math/aime_2024_I/problems/1.tex)
Please reason step by step, and put your final answer within \\boxed{}."
"$pmkvq" eval divergence --model "$model" --chat "$problem" --tokens 4096 --threads 2 \
  --profile profiles/default.profile.json --alt-profile profiles/default-nopi.profile.json --kv-budget 1/5 \
  --methods "fp16,pmkvq,pmkvq+alloc,pmkvq+alloc+rep-alt,pmkvq+alloc+rep,kivi:2" --greedy-tokens 0 \
  --title "Ablation at 1/5 of fp16 bytes, 4096-token AIME trace" \
  --plot docs/ablation.svg --markdown docs/ablation.md --json > docs/ablation.json
cat docs/ablation.md
