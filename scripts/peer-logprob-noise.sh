#!/usr/bin/env bash
# How reproducible are llama.cpp's own log-probs on the default model? Starts the peer's llama-server (built by
# ../shared/tools/peer-llamacpp.sh) on loopback with several settings and compares its top-10 log-probs at the
# last prompt position of every golden case with the golden file. The spread between settings is the floor for
# any parity tolerance against llama.cpp.
#   scripts/peer-logprob-noise.sh [MODEL]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
model=${1:-$here/models/SmolLM2-135M-Instruct.Q4_1.gguf}
bin=$(bash "$here/../shared/tools/peer-llamacpp.sh")
golden="$here/../shared/golden/smollm2-135m-instruct-q4_1.greedy.json"
port=18089
for args in "-fa off" "-fa on" "-fa off -ub 1" "-fa off -t 1"; do
  # shellcheck disable=SC2086
  "$bin/llama-server" -m "$model" -t 2 -c 4096 --host 127.0.0.1 --port $port $args >/dev/null 2>&1 &
  pid=$!
  for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.2; done
  python3 - "$golden" "$port" "$args" <<'PY'
import json, sys, urllib.request
golden, port, label = sys.argv[1], sys.argv[2], sys.argv[3]
g = json.load(open(golden))
ds, missing = [], 0
for c in g["cases"]:
    req = {"prompt": c["prompt_ids"], "n_predict": 1, "n_probs": 10, "temperature": 0, "cache_prompt": False}
    r = json.load(urllib.request.urlopen(urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", data=json.dumps(req).encode(),
        headers={"Content-Type": "application/json"})))
    got = {p["id"]: p["logprob"] for p in r["completion_probabilities"][0]["top_logprobs"]}
    for t in c["last_prompt_top10"]:
        if t["token"] in got:
            ds.append(abs(got[t["token"]] - t["logprob"]))
        else:
            missing += 1
ds.sort()
print(f"llama.cpp {label:14s} |Δ logprob| vs golden: median {ds[len(ds)//2]:.3f}  mean {sum(ds)/len(ds):.3f}  "
      f"max {ds[-1]:.3f}  (tokens that left the top-10: {missing})")
PY
  kill $pid; wait $pid 2>/dev/null || true
done
