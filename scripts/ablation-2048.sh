#!/usr/bin/env bash
# Issue 15's short-trace check: PM-KVQ without calibration against KIVI-2 at 1/4 of the fp16 bytes, on three
# 2048-token reasoning traces the model writes itself (the same problems as scripts/ablation.sh):
#   progressive            the paper's progressive cache alone (equal shares, Equivalent Right Shift)
#   progressive+fit        + the fitted 2-bit floor
#   progressive+rot+fit    + rotation: what `pmkvq` runs without a profile
# Reports in docs/ablation-2048/, the table in docs/ablation-2048.md. ~15 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvq
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
data=../shared/data
out=docs/ablation-2048
mkdir -p "$out"
methods="fp16,progressive@1/4,progressive+fit@1/4,progressive+rot+fit@1/4,kivi:2"
for p in aime_2024_I/problems/1 aime_2024_II/problems/5 cmimc_2024/problems/10; do
  name=$(echo "$p" | tr '/' '-' | sed 's/-problems//')
  problem="$(cat "$data/math/$p.tex")
Please reason step by step, and put your final answer within \\boxed{}."
  "$pmkvq" eval divergence --model "$model" --threads 2 --greedy-tokens 0 --methods "$methods" \
    --chat "$problem" --tokens 2048 --title "2048-token trace of $p at 1/4" \
    --markdown "$out/$name.md" --json > "$out/$name.json"
done
{
  echo "Mean KL to the fp16 cache / top-1 agreement, teacher-forced (\`pmkvq eval divergence\`), on 2048-token"
  echo "traces the model writes from the problem, scored after the prompt. PM-KVQ at 1/4 of the fp16 bytes,"
  echo "without calibration; KIVI-2 at its own bytes (3.22 bits per element, below 1/4)."
  echo
  python3 scripts/ablation-table.py --no-header --order "$methods" "$out"
} > docs/ablation-2048.md
cat docs/ablation-2048.md
