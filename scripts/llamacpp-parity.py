#!/usr/bin/env python3
"""Reference logits from llama.cpp (llama-cpp-python 0.3.36, the version ../shared/golden was made with) for the
tiny random-weight models of tests/common/tiny.rs::parity_specs: every position of a fixed token sequence, then a
greedy continuation with its margins. scripts/llamacpp-parity.sh writes the models and runs this.

    llamacpp-parity.py OUT.json MODEL.gguf [MODEL.gguf ...]
"""

import hashlib
import json
import os
import sys

import numpy as np
from llama_cpp import Llama, __version__

PROMPT_LEN = 40
GREEDY = 24


def reference(path: str) -> dict:
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, n_batch=16, logits_all=True, verbose=False, seed=0)
    vocab = llm.n_vocab()
    # Deterministic ids over the whole vocabulary but the three control tokens (0..2).
    prompt = [3 + (i * 7 + 5) % (vocab - 3) for i in range(PROMPT_LEN)]
    llm.reset()
    llm.eval(prompt)
    logits = [np.array(llm.scores[i], dtype=np.float64) for i in range(len(prompt))]
    greedy, margins = [], []
    for _ in range(GREEDY):
        last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        srt = np.sort(last)[::-1]
        tok = int(np.argmax(last))
        greedy.append(tok)
        margins.append(float(srt[0] - srt[1]))
        llm.eval([tok])
        logits.append(np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64))
    return {
        "model": os.path.basename(path),
        "sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
        "architecture": llm.metadata.get("general.architecture"),
        "prompt_ids": prompt,
        "greedy_ids": greedy,
        "greedy_margins": margins,
        # logits[i]: after prompt_ids + greedy_ids up to position i (teacher-forced), 6 decimals
        "logits": [[round(float(v), 6) for v in row] for row in logits[: PROMPT_LEN + GREEDY - 1]],
    }


def main() -> int:
    out, models = sys.argv[1], sys.argv[2:]
    doc = {
        "generator": f"llama.cpp through llama-cpp-python {__version__}, f16 KV cache, greedy, n_threads=2, n_batch=16",
        "models": [reference(m) for m in models],
    }
    with open(out, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    for m in doc["models"]:
        print(m["model"], m["architecture"], "greedy", m["greedy_ids"][:8], "...", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
