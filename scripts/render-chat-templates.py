#!/usr/bin/env python3
"""Render chat templates the way `transformers.apply_chat_template` does, as the reference for pmkvq's renderer.

Reads JSON on stdin: {"templates": {name: source}, "cases": [{"messages": [...], "add_generation_prompt": bool,
"enable_thinking": bool|null}], "bos_token": str, "eos_token": str}. Writes {name: [{"ok": text} | {"err": msg}]}
in case order.

The environment is the one transformers builds for chat templates: a sandbox with trim_blocks and lstrip_blocks,
loop controls, `tojson` that keeps non-ASCII text, `raise_exception` and `strftime_now`; `tools` and `documents` are
passed as None, as apply_chat_template passes them when a request has none.
"""
import json
import sys
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def strftime_now(fmt):
    return datetime.now().strftime(fmt)


def environment():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env


def main():
    req = json.load(sys.stdin)
    env = environment()
    out = {}
    for name, source in req["templates"].items():
        results = []
        try:
            tmpl = env.from_string(source)
        except Exception as e:  # a template jinja2 cannot parse: every case is an error
            out[name] = [{"err": f"parse: {e}"} for _ in req["cases"]]
            continue
        for case in req["cases"]:
            ctx = dict(
                # role first, as clients send messages and as pmkvq passes them (the request's JSON is sorted).
                messages=[dict(role=m["role"], content=m["content"]) for m in case["messages"]],
                add_generation_prompt=case["add_generation_prompt"],
                tools=None,
                documents=None,
                bos_token=req["bos_token"],
                eos_token=req["eos_token"],
            )
            if case.get("enable_thinking") is not None:
                ctx["enable_thinking"] = case["enable_thinking"]
            try:
                results.append({"ok": tmpl.render(**ctx)})
            except Exception as e:
                results.append({"err": f"{type(e).__name__}: {e}"})
        out[name] = results
    json.dump(out, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
