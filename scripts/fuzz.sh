#!/usr/bin/env bash
# Coverage-guided fuzzing with AFL++ on stable Rust (cargo-afl): every target of pmkvq::fuzz (GGUF reader,
# safetensors directory, tokenizer.json, chat templates, config files, spill codecs, the Generate validator) for
# FUZZ_SECONDS each (default 60), starting from fuzz/corpus/<target>. New corpus entries are merged back
# (FUZZ_KEEP=1); crashes and hangs are copied to fuzz/crashes/<target>/ and fail the run. Prints execs, speed,
# paths and findings per target. Needs a C compiler and make (cargo-afl builds AFL++ once).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"gguf safetensors tokenizer chat_template config spill request openai"}
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$HOME/.cache/pmkvq-fuzz-target}
command -v cc >/dev/null && command -v make >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq build-essential >/dev/null; }
command -v cargo-afl >/dev/null || cargo install --locked cargo-afl
# AFL++ itself, built once per rustc (an existing build is fine)
built=$(cargo afl config --build 2>&1) || grep -q "already built" <<<"$built" || { echo "$built" >&2; exit 1; }
[[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]] || deploy/fetch-model.sh models
export PMKVQ_MODEL=$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf
cargo afl build --release --manifest-path fuzz/Cargo.toml
out=$(mktemp -d)
failed=0
printf '%-14s %10s %10s %8s %8s %8s\n' target execs execs/s corpus crashes hangs
for t in $targets; do
  AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_SKIP_CRASHES=1 \
    cargo afl fuzz -i "fuzz/corpus/$t" -o "$out/$t" -V "$secs" -t 5000 -m none \
    -- "$CARGO_TARGET_DIR/release/$t" >"$out/$t.log" 2>&1 || { echo "fuzz: afl-fuzz failed on $t:"; tail -20 "$out/$t.log"; failed=1; continue; }
  stats=$out/$t/default/fuzzer_stats
  get() { awk -F' *: *' -v k="$1" '$1 == k { print $2 }' "$stats"; }
  printf '%-14s %10s %10s %8s %8s %8s\n' "$t" "$(get execs_done)" "$(get execs_per_sec)" "$(get corpus_count)" \
    "$(get saved_crashes)" "$(get saved_hangs)"
  for kind in crashes hangs; do
    for f in "$out/$t/default/$kind"/id:*; do
      [[ -e $f ]] || continue
      mkdir -p "fuzz/crashes/$t"
      cp "$f" "fuzz/crashes/$t/$kind-$(sha256sum "$f" | cut -c1-16)"
      failed=1
    done
  done
  if [[ ${FUZZ_KEEP:-0} == 1 ]]; then
    for f in "$out/$t/default/queue"/id:*; do
      [[ -e $f ]] && cp "$f" "fuzz/corpus/$t/q-$(sha256sum "$f" | cut -c1-16)"
    done
  fi
done
[[ $failed == 0 ]] || { echo "fuzz: findings copied under fuzz/crashes/ (replayed by tests/fuzz_corpus.rs)"; exit 1; }
echo "fuzz: no crashes or hangs"
