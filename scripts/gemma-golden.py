"""llama.cpp's reference outputs for Gemma-3-270M (tests/golden/gemma3-270m.json), the way ../shared/golden was
made for SmolLM2 (make_golden.py): greedy tokens with their top-1/top-2 margins and the last prompt position's
top-10 log-probs, on the shared prompts. The GGUF ships no chat template (it is the pretrained model), so each
prompt is its text (system message, a blank line, then the user message) after BOS.

One more case, `long`: a text of ~2,000 tokens (every shared competition problem, in file order) teacher-forced,
with the top-10 log-probs at every 64th position — past the 512-token sliding window of the local layers, so
the windows and the global layers' RoPE are checked, not only short contexts.

    python scripts/gemma-golden.py MODEL OUT PROMPTS_JSON PROBLEMS_DIR [N_GEN]
"""
import glob, hashlib, json, os, sys
import numpy as np
from llama_cpp import Llama

MODEL, OUT, PROMPTS, PROBLEMS = sys.argv[1:5]
N_GEN = int(sys.argv[5]) if len(sys.argv) > 5 else 128
LONG_STRIDE = 64

llm = Llama(model_path=MODEL, n_ctx=4096, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0)


def top10(logits):
    logits = np.asarray(logits, dtype=np.float64)
    lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
    return [{"token": int(k), "logprob": float(logits[k] - lse)} for k in np.argsort(-logits)[:10]]


out = {
    "model_file": os.path.basename(MODEL),
    "model_sha256": hashlib.sha256(open(MODEL, "rb").read()).hexdigest(),
    "generator": "llama.cpp (llama-cpp-python 0.3.36), f16 KV cache, greedy (argmax), n_threads=2",
    "cases": [],
}
for p in json.load(open(PROMPTS)):
    text = (p["system"] + "\n\n" if p.get("system") else "") + p["user"]
    ids = llm.tokenize(text.encode(), add_bos=True, special=False)
    llm.reset()
    llm.eval(ids)
    last = llm.scores[len(ids) - 1]
    gen, margins = [], []
    for _ in range(N_GEN):
        logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        tok = int(np.argmax(logits))
        srt = np.sort(logits)[::-1]
        margins.append(float(srt[0] - srt[1]))
        gen.append(tok)
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    out["cases"].append({
        "id": p["id"], "prompt_text": text, "prompt_ids": ids, "last_prompt_top10": top10(last),
        "greedy_ids": gen, "greedy_margins": margins,
        "greedy_text": llm.detokenize(gen).decode("utf-8", errors="replace"),
    })
    print(p["id"], len(ids), len(gen), repr(out["cases"][-1]["greedy_text"][:100]), file=sys.stderr)

files = sorted(glob.glob(os.path.join(PROBLEMS, "*", "problems", "*.tex")))
text = "\n\n".join(open(f).read().strip() for f in files)
ids = llm.tokenize(text.encode(), add_bos=True, special=False)[:2048]
llm.reset()
llm.eval(ids)
positions = list(range(LONG_STRIDE - 1, len(ids), LONG_STRIDE))
out["long"] = {
    "prompt_ids": ids,
    "positions": positions,
    "top10": [top10(llm.scores[i]) for i in positions],
}
print("long", len(ids), "tokens,", len(positions), "positions", file=sys.stderr)

# The peer's own reproducibility on this model: the same build with flash attention on (only the attention's
# rounding and summation order change). Gemma-3-270M is far more sensitive to last-bit differences than
# SmolLM2, so the tests' tolerances come from this measurement.
fa = Llama(model_path=MODEL, n_ctx=4096, n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0,
           flash_attn=True)
fa.eval(ids)
deltas = []
for pos, want in zip(positions, out["long"]["top10"]):
    l = np.array(fa.scores[pos], dtype=np.float64)
    lse = np.log(np.exp(l - l.max()).sum()) + l.max()
    deltas += [abs(l[w["token"]] - lse - w["logprob"]) for w in want]
flips = []
for c in out["cases"]:
    fa.reset()
    fa.eval(c["prompt_ids"])
    for i, want in enumerate(c["greedy_ids"]):
        t = int(np.argmax(fa.scores[fa.n_tokens - 1]))
        if t != want:
            flips.append(c["greedy_margins"][i])
            break
        fa.eval([t])
out["peer_noise"] = {
    "what": "llama.cpp with flash attention on against the golden (off): long-text top-10 |d logprob|, and the "
            "golden margin at each case's first greedy flip",
    "long_mean": float(np.mean(deltas)), "long_max": float(np.max(deltas)), "flip_margins": flips,
}
print("peer noise", out["peer_noise"], file=sys.stderr)
json.dump(out, open(OUT, "w"), indent=1)
