#!/usr/bin/env python3
"""Summarize scripts/ablation.sh's JSON reports (one per trace, one for botchan) into one Markdown table:
mean KL to the fp16 cache and top-1 agreement per method, per trace, and the mean over the traces.

  ablation-table.py [--no-header] [--order M1,M2,...] DIR
                                                 the table (rows in that order, then any others)
  ablation-table.py --merge NEW DIR              put NEW's reports' rows into DIR's, replacing rows of the same
                                                 name; refuses unless both fp16 rows saw the same sequence
  ablation-table.py --flips [--order ...] DIR    where the top-1 disagreements fall: per method and report, the
                                                 flips, those on the f16 cache's near-ties (its top two within
                                                 0.1 nats), and top-1 agreement on every other position
"""
import json
import pathlib
import sys


def load(d):
    return {p.stem: json.loads(p.read_text()) for p in sorted(pathlib.Path(d).glob("*.json"))}


def row(rep, name):
    return next((m for m in rep["methods"] if m["method"] == name), None)


def merge(new_dir, dst_dir):
    new, old = load(new_dir), load(dst_dir)
    for name, rep in new.items():
        if name not in old:
            sys.exit(f"{name}: no report in {dst_dir} to merge into")
        base = old[name]
        a, b = row(rep, "fp16"), row(base, "fp16")
        same = a and b and rep["tokens"] == base["tokens"] and rep["scored_from"] == base["scored_from"]
        if not same or abs(a["ppl"] - b["ppl"]) > 1e-9:
            sys.exit(f"{name}: the rerun saw another sequence (fp16 ppl {a and a['ppl']} vs {b and b['ppl']})")
        for m in rep["methods"]:
            if m["method"] == "fp16":
                continue
            i = next((i for i, x in enumerate(base["methods"]) if x["method"] == m["method"]), None)
            if i is None:
                base["methods"].append(m)
            else:
                base["methods"][i] = m
        pathlib.Path(dst_dir, f"{name}.json").write_text(json.dumps(base, indent=2) + "\n")
        md = pathlib.Path(new_dir, f"{name}.md")
        if md.exists():
            with open(pathlib.Path(dst_dir, f"{name}.md"), "a") as f:
                f.write("\n\nRerun of some rows (they replace the rows of the same name in the JSON):\n\n")
                f.write(md.read_text())


def cell(m):
    if m is None:
        return "—"
    s = f"{m['mean_kl']:.4f} / {m['top1_agreement']:.3f}"
    if not m["within_budget"] or m["stopped"]:
        s += " (out of budget)" if m["stopped"] else " (over)"
    return s


def ordered(reports, order, keep=lambda m: True):
    """The methods of every report that `keep` accepts: those `order` names first, in its order, then the rest."""
    seen = [m["method"] for rep in reports.values() for m in rep["methods"] if keep(m)]
    return list(dict.fromkeys([m for m in order if m in seen] + seen))


def table(d, order, header=True):
    reports = load(d)
    traces = [k for k in reports if k != "botchan"]
    methods = ordered(reports, order)
    if header:
        print_header()
    emit(reports, traces, methods)


def print_header():
    print("Mean KL to the fp16 cache / top-1 agreement, teacher-forced (`pmkvq eval divergence`).")
    print("Traces: 4096 tokens the model writes from the problem, scored after the prompt; botchan: 4 × 2048-token")
    print("chunks, second halves scored (llama-perplexity's protocol). Budgets: 1/5 and 9/32 (q4_0's 4.5 bits) of")
    print("the fp16 bytes of the sequence, `min` PM-KVQ's floor with the paper's full 128-token window, `floor`")
    print("the elastic window's (the 16-bit sink and every other token at 2 bits); fixed-width methods at their")
    print("own bytes (bits/element column, botchan).\n")


def emit(reports, traces, methods):
    head = ["method"] + traces + ["traces mean KL", "botchan", "bits/elem"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in methods:
        cells = [cell(row(reports[t], name)) for t in traces]
        kls = [row(reports[t], name)["mean_kl"] for t in traces if row(reports[t], name)]
        mean = f"{sum(kls) / len(kls):.4f}" if kls else "—"
        b = row(reports.get("botchan", {"methods": []}), name)
        # botchan's bits per element; without botchan, the mean over the traces
        tb = [row(reports[t], name)["bits_per_element"] for t in traces if row(reports[t], name)]
        bits = f"{b['bits_per_element']:.2f}" if b else (f"{sum(tb) / len(tb):.2f}" if tb else "—")
        print(f"| {name} | " + " | ".join(cells) + f" | {mean} | {cell(b)} | {bits} |")


def flips(d, order):
    reports = load(d)
    names = list(reports)
    methods = ordered(reports, order, lambda m: "flips" in m and m["method"] != "fp16")
    # the reference's near-ties over every scored position: a method that ran out of budget scored fewer
    ties = {n: max((m["near_ties"] for m in reports[n]["methods"] if "near_ties" in m), default=None) for n in names}
    head = ["method"] + [f"{n} ({ties[n]} near-ties)" for n in names]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for name in methods:
        cells = []
        for n in names:
            m = row(reports[n], name)
            if m is None or "flips" not in m:
                cells.append("—")
                continue
            decided = m["scored_tokens"] - m["near_ties"]
            agree = 1 - (m["flips"] - m["near_tie_flips"]) / max(decided, 1)
            cells.append(f"{m['flips']} ({m['near_tie_flips']}) · {agree:.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


args = sys.argv[1:]
header = "--no-header" not in args
args = [a for a in args if a != "--no-header"]
if args[:1] == ["--merge"]:
    merge(args[1], args[2])
else:
    mode = flips if args[:1] == ["--flips"] else None
    args = args[1:] if mode else args
    order = []
    if args[:1] == ["--order"]:
        order = args[1].split(",")
        args = args[2:]
    d = args[0] if args else "docs/ablation"
    if mode:
        flips(d, order)
    else:
        table(d, order, header)
