#!/usr/bin/env python3
"""Summarize scripts/ablation.sh's JSON reports (one per trace, one for botchan) into one Markdown table:
mean KL to the fp16 cache and top-1 agreement per method, per trace, and the mean over the traces."""
import json
import pathlib
import sys

d = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "docs/ablation")
reports = {p.stem: json.loads(p.read_text()) for p in sorted(d.glob("*.json"))}
traces = [k for k in reports if k != "botchan"]
methods = [m["method"] for m in next(iter(reports.values()))["methods"]]


def row(rep, name):
    return next((m for m in rep["methods"] if m["method"] == name), None)


def cell(m):
    if m is None:
        return "—"
    s = f"{m['mean_kl']:.4f} / {m['top1_agreement']:.3f}"
    if not m["within_budget"] or m["stopped"]:
        s += " (out of budget)" if m["stopped"] else " (over)"
    return s


print("Mean KL to the fp16 cache / top-1 agreement, teacher-forced (`pmkvq eval divergence`).")
print("Traces: 4096 tokens the model writes from the problem, scored after the prompt; botchan: 4 × 2048-token")
print("chunks, second halves scored (llama-perplexity's protocol). Budgets: 1/5 and 9/32 (q4_0's 4.5 bits) of")
print("the fp16 bytes of the sequence; fixed-width methods at their own bytes (bits/element column, botchan).\n")
head = ["method"] + traces + ["traces mean KL", "botchan", "bits/elem"]
print("| " + " | ".join(head) + " |")
print("|" + "---|" * len(head))
for name in methods:
    cells = [cell(row(reports[t], name)) for t in traces]
    kls = [row(reports[t], name)["mean_kl"] for t in traces if row(reports[t], name)]
    mean = f"{sum(kls) / len(kls):.4f}" if kls else "—"
    b = row(reports.get("botchan", {"methods": []}), name)
    bits = f"{b['bits_per_element']:.2f}" if b else "—"
    print(f"| {name} | " + " | ".join(cells) + f" | {mean} | {cell(b)} | {bits} |")
