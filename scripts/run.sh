#!/usr/bin/env bash
# Fetch the default model, build, and stream a generation from it. Extra arguments go to `pmkvq generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvq
if [[ $# -eq 0 ]]; then
  set -- --chat "A train travels 120 kilometres in 1.5 hours. What is its average speed? Explain your reasoning." --max-tokens 200
fi
exec "$CARGO_TARGET_DIR/release/pmkvq" generate --model "$model" "$@"
