#!/usr/bin/env bash
# Soak pmkvqd (issue 14): 16 concurrent streams on loopback for 10 minutes (override: SOAK_MINUTES), mixed KV
# methods and lengths, clients that cancel, the budget cut by 75 % half-way, WatchStatus read throughout.
# Fails (exit 1) on any KV snapshot over the budget, any error, or anything left after the run; prints the
# finish reasons, the memory_pressure rate among requests that fit alone, and RSS every 5 s.
# Extra arguments go to the soak (e.g. --budget 32MiB --clients 8 --set engine.kv_method=fp16).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
[[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]] || deploy/fetch-model.sh models
cargo build --release --quiet --bin pmkvqd --example soak
exec "$CARGO_TARGET_DIR/release/examples/soak" --minutes "${SOAK_MINUTES:-10}" "$@"
