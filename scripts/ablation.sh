#!/usr/bin/env bash
# Issue 15's ablation at equal true bytes: on three 4096-token reasoning traces the model writes itself and on
# botchan.txt with llama-perplexity's protocol (4 × 2048-token chunks, second halves scored), each PM-KVQ step at
# 1/5 of the fp16 bytes and at q4_0's bytes (9/32: 4.5 of 16 bits):
#   progressive                      the paper's progressive cache alone (equal shares)
#   +alloc                           calibrated per-layer shares (the paper's allocation, unrotated profile)
#   +rep                             + key reparameterization (the paper's method as published)
#   +rot                             + rotation (randomized Walsh-Hadamard on Q/K/V, this profile's calibration)
#   +plan                            + run-time K/V-asymmetric widths planned on the rotated K/V sensitivity
#                                    (replacing the shares)
#   +fit                             + the fitted 2-bit floor (least-squares grid when a group lands at 2 bits)
#   pmkvq = +fit+elastic+ws6         + the elastic window, capped at a sixth of the budget (8-bit once it binds):
#                                    the method as shipped (profiles/default.profile.json)
# beside KIVI-2, RTN-2, q4_0 with and without rotation and q8_0 (fixed widths, their own bytes).
# Calibrates twice first (rotated: the shipped profile; unrotated: the paper's). ~100 min on 2 cores.
# Usage: scripts/ablation.sh [--skip-calibration] [--rows M1,M2,...] [--short]
#   --rows reruns only those methods (fp16 is always run) and merges them into the reports in docs/ablation/,
#   replacing rows of the same name: for a change that moves only some rows.
#   --short runs only the 2048-token check instead (~20 min, no calibration): PM-KVQ without calibration against
#   KIVI-2 at 1/4 of the fp16 bytes, on the same three problems — `progressive` (the paper's progressive cache
#   alone, equal shares), `+fit` (the fitted 2-bit floor), `+rot` (rotation), `+g32` (32-value groups), `+w32`
#   (a 32-token window), `+plan-even` (one budget over every body, every layer alike), `+plan-k` / `+plan-v`
#   (the same, keys / values kept wider first), `+rot+fit` (the equal-share build shipped before), and `pmkvq`
#   with `--profile none` (what `pmkvq` runs without a profile). Reports in docs/ablation-2048/, the table in
#   docs/ablation-2048.md.
set -euo pipefail
cd "$(dirname "$0")/.."
calibrate=1 rows= short=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --skip-calibration) calibrate=0 ;;
    --rows) rows=$2; shift ;;
    --short) short=1; calibrate=0 ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvq
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
data=../shared/data
problems=(aime_2024_I/problems/1 aime_2024_II/problems/5 cmimc_2024/problems/10)
chat() { # the problem as the traces ask it
  echo "$(cat "$data/math/$1.tex")
Please reason step by step, and put your final answer within \\boxed{}."
}
name() { echo "$1" | tr '/' '-' | sed 's/-problems//'; }
if [[ $short == 1 ]]; then
  out=docs/ablation-2048
  mkdir -p "$out"
  methods="fp16,progressive@1/4,progressive+fit@1/4,progressive+rot@1/4,progressive+g32@1/4,progressive+w32@1/4"
  methods+=",progressive+plan-even@1/4,progressive+plan-k@1/4,progressive+plan-v@1/4,progressive+rot+fit@1/4"
  methods+=",pmkvq@1/4,kivi:2"
  for p in "${problems[@]}"; do
    "$pmkvq" eval divergence --model "$model" --threads 2 --greedy-tokens 0 --methods "$methods" --profile none \
      --chat "$(chat "$p")" --tokens 2048 --title "2048-token trace of $p at 1/4" \
      --markdown "$out/$(name "$p").md" --json > "$out/$(name "$p").json"
  done
  {
    echo "Mean KL to the fp16 cache / top-1 agreement, teacher-forced (\`pmkvq eval divergence --profile none\`),"
    echo "on 2048-token traces the model writes from the problem, scored after the prompt. PM-KVQ at 1/4 of the"
    echo "fp16 bytes, without calibration (\`pmkvq\` is what runs without a profile); KIVI-2 at its own bytes"
    echo "(3.22 bits per element, below 1/4). bits/elem: true bits per element at the end, mean over the traces."
    echo
    python3 scripts/ablation-table.py --no-header --order "$methods" "$out"
  } > docs/ablation-2048.md
  cat docs/ablation-2048.md
  exit 0
fi
mkdir -p profiles docs/ablation
if [[ $calibrate == 1 ]]; then
  /usr/bin/time -f "calibration (rotated): %e s wall, %M KiB peak RSS" \
    "$pmkvq" calibrate --model "$model" --data "$data" --threads 2 --out profiles/default.profile.json \
    > docs/calibration-table.md
  /usr/bin/time -f "calibration (unrotated): %e s wall, %M KiB peak RSS" \
    "$pmkvq" calibrate --model "$model" --data "$data" --threads 2 --no-rotate \
    --out profiles/unrotated.profile.json > /dev/null
fi
steps() { # $1 = budget
  local b=$1
  echo -n "progressive@$b,progressive+alloc+alt@$b,progressive+alloc+rep+alt@$b,progressive+alloc+rep+rot@$b,"
  echo -n "progressive+alloc+rep+rot+plan@$b,progressive+alloc+rep+rot+plan+fit@$b,pmkvq@$b,"
}
floors="progressive+alloc+rep+rot+plan@min,progressive+alloc+rep+rot+plan+fit@min,pmkvq@min,pmkvq@floor"
methods="fp16,f32,$(steps 1/5)$(steps 9/32)$floors,kivi:2,rtn:2,q4_0,q4_0+rot,q8_0"
order=$methods
out=docs/ablation
if [[ -n $rows ]]; then
  methods="fp16,$rows"
  out=$(mktemp -d)
fi
common=(--model "$model" --threads 2 --profile profiles/default.profile.json
  --alt-profile profiles/unrotated.profile.json --greedy-tokens 0 --methods "$methods")
for p in "${problems[@]}"; do
  "$pmkvq" eval divergence "${common[@]}" --chat "$(chat "$p")" --tokens 4096 \
    --title "Ablation, 4096-token trace of $p" \
    --markdown "$out/$(name "$p").md" --json > "$out/$(name "$p").json"
done
"$pmkvq" eval divergence "${common[@]}" --text-file "$data/text/botchan.txt" --tokens 8192 --chunk-len 2048 \
  --title "Ablation, botchan.txt (4 x 2048 tokens, second halves scored)" \
  --markdown "$out/botchan.md" --json > "$out/botchan.json"
if [[ -n $rows ]]; then
  python3 scripts/ablation-table.py --merge "$out" docs/ablation
fi
{
  python3 scripts/ablation-table.py --order "$order" docs/ablation
  echo
  echo "Where the top-1 disagreements fall: flips (those on the fp16 cache's near-ties, its top two log-probs within"
  echo "0.1 nats) · top-1 agreement on every other position. \`f32\` is an exact cache: what rounding the reference"
  echo "to f16 alone moves."
  echo
  python3 scripts/ablation-table.py --flips --order "$order" docs/ablation
} > docs/ablation.md
cat docs/ablation.md
