#!/usr/bin/env bash
# Batched decode next to llama.cpp: pmkvqd's total tokens/s for 1, 4 and 8 concurrent streams of 64 tokens over
# loopback gRPC (`cargo bench --bench serve`: short prompts, EOS ignored) and llama.cpp decoding 1, 4 and 8
# parallel sequences of 64 tokens after an 8-token prompt each (`llama-batched-bench`, engine only, no network),
# same model and thread count, run interleaved — round r runs both before round r+1 — and reported as medians,
# because this machine drifts ±25 % between minutes. What matters is each one's 8-stream/1-stream ratio (what
# batching buys) and the 8-stream totals side by side.
#   scripts/serve-vs-llamacpp.sh              THREADS=2 ROUNDS=3 by default
# llama.cpp's llama-batched-bench is built once (~6 min; ~10 with the peer tools when they are missing) from the
# same vendored sources as ../shared/tools/peer-llamacpp.sh, into the same prefix.
set -euo pipefail
cd "$(dirname "$0")/.."
threads=${THREADS:-2}
rounds=${ROUNDS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
prefix=${PEER_PREFIX:-$HOME/.cache/pmkvq-peer}
batched=$prefix/bin/llama-batched-bench
if [[ ! -x $batched ]]; then
  version=0.3.36 # the version peer-llamacpp.sh builds
  work=$(mktemp -d)
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  command -v ninja >/dev/null || python3 -m pip install -q ninja
  python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work" >&2
  tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
  src="$work/llama_cpp_python-$version/vendor/llama.cpp"
  cmake -S "$src" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=ON >&2
  # the peer script's tools too when they are missing: one build instead of two
  tools="llama-batched-bench"
  [[ -x $prefix/bin/llama-bench ]] \
    || tools+=" llama-bench llama-cli llama-completion llama-perplexity llama-server llama-tokenize"
  # shellcheck disable=SC2086
  cmake --build "$work/build" -j "$(nproc)" --target $tools >&2
  mkdir -p "$prefix/bin"
  for t in $tools; do cp "$work/build/bin/$t" "$prefix/bin/"; done
  rm -rf "$work"
fi
cargo bench --bench serve --no-run >&2
serve=$(ls -t "$CARGO_TARGET_DIR"/release/deps/serve-* | grep -v '\.d$' | head -1)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for r in $(seq 1 "$rounds"); do
  echo "round $r/$rounds: pmkvqd (cargo bench --bench serve)" >&2
  PMKVQ_BENCH_THREADS=$threads "$serve" --bench >"$out/serve-$r.txt" 2>&1
  for n in 1 4 8; do
    est="$CARGO_TARGET_DIR/criterion/grpc_batched_decode/${n}_streams/new/estimates.json"
    python3 -c "import json,sys; print($n, $n*64/(json.load(open('$est'))['mean']['point_estimate']*1e-9))" \
      >>"$out/pmkvq.txt"
  done
  echo "round $r/$rounds: llama-batched-bench" >&2
  "$batched" -m "$model" -t "$threads" -c 2048 -b 512 -ub 512 -npp 8 -ntg 64 -npl 1,4,8 >"$out/llama-$r.txt" 2>&1
  # | PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s |
  awk -F'|' '$2 ~ /^ *8 *$/ && $3 ~ /^ *64 *$/ { gsub(/ /, ""); print $4, $9, $11 }' "$out/llama-$r.txt" >>"$out/llama.txt"
done
python3 - "$out" "$threads" "$rounds" <<'EOF'
import statistics, sys
out, threads, rounds = sys.argv[1], sys.argv[2], sys.argv[3]
ours, tg, tot = {}, {}, {}
for line in open(f"{out}/pmkvq.txt"):
    n, v = line.split()
    ours.setdefault(int(n), []).append(float(v))
for line in open(f"{out}/llama.txt"):
    b, s_tg, s = line.split()
    tg.setdefault(int(b), []).append(float(s_tg))
    tot.setdefault(int(b), []).append(float(s))
med = lambda d, k: statistics.median(d[k])
print(f"threads {threads}, medians of {rounds} interleaved rounds (tokens/s, 64 new tokens per stream)\n")
print("| streams | pmkvqd over gRPC (incl. prompt) | × one stream | llama-batched-bench S_TG (decode only) | × one | its S (incl. prompt) |")
print("|---|---|---|---|---|---|")
for n in sorted(ours):
    print(f"| {n} | {med(ours, n):.1f} | {med(ours, n) / med(ours, 1):.2f} | {med(tg, n):.1f} | "
          f"{med(tg, n) / med(tg, 1):.2f} | {med(tot, n):.1f} |")
EOF
