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
#   pmkvq = +fit                     + the fitted 2-bit floor (least-squares grid when a group lands at 2 bits):
#                                    the method as shipped (profiles/default.profile.json)
# beside KIVI-2, RTN-2, q4_0 with and without rotation and q8_0 (fixed widths, their own bytes).
# Calibrates twice first (rotated: the shipped profile; unrotated: the paper's). ~100 min on 2 cores.
# Usage: scripts/ablation.sh [--skip-calibration] [--rows M1,M2,...]
#   --rows reruns only those methods (fp16 is always run) and merges them into the reports in docs/ablation/,
#   replacing rows of the same name: for a change that moves only some rows.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvq
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
data=../shared/data
mkdir -p profiles docs/ablation
calibrate=1 rows=
while [[ $# -gt 0 ]]; do
  case $1 in
    --skip-calibration) calibrate=0 ;;
    --rows) rows=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 64 ;;
  esac
  shift
done
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
  echo -n "progressive+alloc+rep+rot+plan@$b,pmkvq@$b,"
}
methods="fp16,$(steps 1/5)$(steps 9/32)progressive+alloc+rep+rot+plan@min,pmkvq@min,kivi:2,rtn:2,q4_0,q4_0+rot,q8_0"
order=$methods
out=docs/ablation
if [[ -n $rows ]]; then
  methods="fp16,$rows"
  out=$(mktemp -d)
fi
common=(--model "$model" --threads 2 --profile profiles/default.profile.json
  --alt-profile profiles/unrotated.profile.json --greedy-tokens 0 --methods "$methods")
for p in aime_2024_I/problems/1 aime_2024_II/problems/5 cmimc_2024/problems/10; do
  name=$(echo "$p" | tr '/' '-' | sed 's/-problems//')
  problem="$(cat "$data/math/$p.tex")
Please reason step by step, and put your final answer within \\boxed{}."
  "$pmkvq" eval divergence "${common[@]}" --chat "$problem" --tokens 4096 \
    --title "Ablation, 4096-token trace of $p" \
    --markdown "$out/$name.md" --json > "$out/$name.json"
done
"$pmkvq" eval divergence "${common[@]}" --text-file "$data/text/botchan.txt" --tokens 8192 --chunk-len 2048 \
  --title "Ablation, botchan.txt (4 x 2048 tokens, second halves scored)" \
  --markdown "$out/botchan.md" --json > "$out/botchan.json"
if [[ -n $rows ]]; then
  python3 scripts/ablation-table.py --merge "$out" docs/ablation
fi
python3 scripts/ablation-table.py --order "$order" docs/ablation > docs/ablation.md
cat docs/ablation.md
