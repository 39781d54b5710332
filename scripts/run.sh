#!/usr/bin/env bash
# Fetch the default model, build, and run the daemon on it in the foreground (Ctrl-C / SIGTERM drains and exits).
# Extra arguments go to `pmkvqd`, e.g. `scripts/run.sh --listen 127.0.0.1:6000 --set engine.max_running=4`.
# The OpenAI-compatible HTTP API is on 127.0.0.1:8080 (PMKVQ_HTTP_LISTEN; `--http-listen ""` turns it off).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvqd --bin pmkvq
export PMKVQ_HTTP_LISTEN=${PMKVQ_HTTP_LISTEN-127.0.0.1:8080}
exec "$CARGO_TARGET_DIR/release/pmkvqd" --model "$model" "$@"
