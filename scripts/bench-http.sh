#!/usr/bin/env bash
# One stream over HTTP (the openai package, SSE) next to the same stream over gRPC (grpcio), on one pmkvqd started
# here with both listeners on loopback: time to first token and decode tok/s, interleaved, medians (issue 18's
# "within 5 % of gRPC"). Twice: with the official client, and with a
# standard-library reader (the server's cost alone, without the client's per-chunk parsing). Writes
# docs/bench-http-{openai,raw}.json and prints the medians.
#   scripts/bench-http.sh                 ROUNDS=9 TTFT_ROUNDS=41 MAX_TOKENS=256 THREADS=2 by default
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
venv=${PMKVQ_VENV:-$HOME/.cache/pmkvq-venv}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r clients/python/requirements.txt
model=$(deploy/fetch-model.sh models)
cargo build --release --bin pmkvqd >&2
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
grpc_port=$(free_port)
http_port=$(free_port)
"$CARGO_TARGET_DIR/release/pmkvqd" --model "$model" --listen "127.0.0.1:$grpc_port" --threads "${THREADS:-2}" \
  --set "http.listen=127.0.0.1:$http_port" --set log.filter=warn &
daemon=$!
trap 'kill $daemon 2>/dev/null; wait $daemon 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$http_port/health" >/dev/null && break
  sleep 0.1
done
curl -sf "http://127.0.0.1:$http_port/health" >/dev/null || { echo "bench-http: pmkvqd did not become healthy" >&2; exit 1; }
for client in openai raw; do
  echo "== HTTP client: $client"
  "$venv/bin/python" scripts/bench-http.py --grpc "127.0.0.1:$grpc_port" --http "http://127.0.0.1:$http_port/v1" \
    --rounds "${ROUNDS:-9}" --ttft-rounds "${TTFT_ROUNDS:-41}" --max-tokens "${MAX_TOKENS:-256}" --http-client $client --json "docs/bench-http-$client.json"
done
