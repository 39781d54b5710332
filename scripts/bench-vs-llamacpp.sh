#!/usr/bin/env bash
# pmkvq next to llama.cpp on this machine (llama.cpp's f16 cache with flash attention off and on: on this CPU
# its f16 flash-attention path is the slower one at depth; q4_0 needs it on): same model, same thread count, the same tests (llama-bench's pp/tg at
# a depth), run interleaved — round r runs every pmkvq test and every llama-bench test once before round r+1 —
# and reported as medians over the rounds, because this machine drifts ±25 % between minutes.
#   scripts/bench-vs-llamacpp.sh                 THREADS=2 ROUNDS=3 DEPTH=4096 DEEP=8128 by default
#   MODEL=gemma3 scripts/bench-vs-llamacpp.sh    Gemma-3-270M (fp16 caches only: PM-KVQ at 1/5 is below its
#                                                windows' own f16 cost, see README)
# llama.cpp's tools are built once by ../shared/tools/peer-llamacpp.sh (~10 min). Prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
rounds=${ROUNDS:-3}
depth=${DEPTH:-4096}
deep=${DEEP:-8128}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models "${MODEL:-smollm2}")
bin=$(bash ../shared/tools/peer-llamacpp.sh)
cargo build --release --bin pmkvq >&2
pmkvq="$CARGO_TARGET_DIR/release/pmkvq"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# name | pmkvq bench arguments | llama-bench arguments
tests=(
  "d0|--depth 0 --prompt 512 --gen 128 --kv fp16|-fa 0,1 -d 0 -p 512 -n 128"
  "fp16|--depth $depth --prompt 512 --gen 64 --kv fp16|-fa 0,1 -d $depth -p 512 -n 64"
  "pmkvq|--depth $depth --prompt 0 --gen 64 --kv pmkvq --kv-budget 1/5|-fa 1 -d $depth -p 0 -n 64 -ctk q4_0 -ctv q4_0"
  "deep|--depth $deep --prompt 0 --gen 64 --kv pmkvq --kv-budget 1/5|-fa 0,1 -d $deep -p 0 -n 64"
)
if [[ ${MODEL:-smollm2} == gemma3 ]]; then
  tests=("${tests[@]:0:2}")
fi
for r in $(seq 1 "$rounds"); do
  for t in "${tests[@]}"; do
    IFS='|' read -r name ours theirs <<<"$t"
    echo "round $r/$rounds: $name" >&2
    # shellcheck disable=SC2086
    "$pmkvq" bench --model "$model" --threads "$threads" --reps 1 --json $ours >>"$out/pmkvq-$name.jsonl"
    # shellcheck disable=SC2086
    "$bin/llama-bench" -m "$model" -t "$threads" -r 1 -o jsonl $theirs >>"$out/llama-$name.jsonl" 2>/dev/null
  done
done
python3 - "$out" "$threads" "$rounds" <<'EOF'
import json, os, statistics, sys
out, threads, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
ours, theirs = {}, {}
for f in sorted(os.listdir(out)):
    who = f.split('-', 1)[0]
    for line in open(os.path.join(out, f)):
        line = line.strip()
        if not line.startswith('{'):
            continue
        j = json.loads(line)
        if who == 'pmkvq':
            kv = j['kv'] + (f" at {j['budget_bytes'] / j['fp16_bytes']:.2f}× fp16" if j.get('budget_bytes') else '')
            ours.setdefault((j['test'], j['n'], j['depth'], kv), []).append(j['mean'])
        else:
            test = 'pp' if j['n_prompt'] > 0 else 'tg'
            kv = f"{j['type_k']}/{j['type_v']}, flash-attn {'on' if j.get('flash_attn') else 'off'}"
            theirs.setdefault((test, j['n_prompt'] or j['n_gen'], j['n_depth'], kv), []).append(j['avg_ts'])
print(f"threads {threads}, medians of {rounds} interleaved rounds (tokens/s)\n")
print("| test | pmkvq KV | pmkvq | llama.cpp KV | llama.cpp | ratio |")
print("|---|---|---|---|---|---|")
for (test, n, d, kv), p in sorted(ours.items(), key=lambda x: (x[0][2], x[0][0], x[0][3])):
    for (t2, n2, d2, kv2), l in sorted(theirs.items()):
        if (t2, n2, d2) != (test, n, d):
            continue
        pm, lm = statistics.median(p), statistics.median(l)
        label = f"{test}{n}" + (f" @ d{d}" if d else "")
        print(f"| {label} | {kv} | {pm:.1f} (n={len(p)}) | {kv2} | {lm:.1f} (n={len(l)}) | {pm / lm:.2f} |")
EOF
