#!/usr/bin/env python3
"""Drives pmkvqd's OpenAI-compatible HTTP API with the official `openai` package (tests/http_openai.rs).

    openai_check.py check BASE_URL CHAT_PROMPT TEXT_PROMPT MAX_TOKENS   -> one JSON object with every result
    openai_check.py disconnect BASE_URL                                 -> prints "closed" after closing a stream
    openai_check.py tls BASE_URL CA_PEM                                 -> a completion over HTTPS, as JSON

Nothing is asserted here: the Rust test compares what this prints with gRPC Generate.
"""

import json
import sys
import time

import openai


def client(base_url: str) -> openai.OpenAI:
    # The API key is sent as a bearer token; generation routes do not need one.
    return openai.OpenAI(base_url=base_url, api_key="sk-unused", max_retries=0, timeout=120)


def error_of(e: openai.APIStatusError) -> dict:
    return {"status": e.status_code, "body": e.body}


def check(base_url: str, chat_prompt: str, text_prompt: str, max_tokens: int) -> dict:
    c = client(base_url)
    out: dict = {}
    models = c.models.list()
    out["models"] = [m.id for m in models.data]
    model = out["models"][0]
    messages = [{"role": "user", "content": chat_prompt}]

    r = c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    out["chat"] = {
        "text": r.choices[0].message.content,
        "role": r.choices[0].message.role,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump(),
        "object": r.object,
        "id": r.id,
    }

    text, roles, finish, usage, n_chunks = "", [], None, None, 0
    stream = c.chat.completions.create(
        model=model,
        messages=messages,
        max_completion_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        n_chunks += 1
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
        for ch in chunk.choices:
            if ch.delta.role:
                roles.append(ch.delta.role)
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    out["chat_stream"] = {"text": text, "roles": roles, "finish_reason": finish, "usage": usage, "chunks": n_chunks}

    r = c.completions.create(model=model, prompt=text_prompt, max_tokens=max_tokens)
    out["completion"] = {
        "text": r.choices[0].text,
        "finish_reason": r.choices[0].finish_reason,
        "usage": r.usage.model_dump(),
        "object": r.object,
    }

    text, finish = "", None
    for chunk in c.completions.create(model=model, prompt=text_prompt, max_tokens=max_tokens, stream=True):
        for ch in chunk.choices:
            text += ch.text
            finish = ch.finish_reason or finish
    out["completion_stream"] = {"text": text, "finish_reason": finish}

    errors = {}
    for name, call in {
        "temperature": lambda: c.chat.completions.create(model=model, messages=messages, temperature=-1),
        "n": lambda: c.chat.completions.create(model=model, messages=messages, n=2),
        "max_tokens": lambda: c.completions.create(model=model, prompt=text_prompt, max_tokens=10**9),
        "empty_messages": lambda: c.chat.completions.create(model=model, messages=[]),
        "unknown_field": lambda: c.chat.completions.create(
            model=model, messages=messages, extra_body={"max_token": 3}
        ),
        "model": lambda: c.chat.completions.create(model="gpt-none", messages=messages),
    }.items():
        try:
            call()
            errors[name] = None
        except openai.APIStatusError as e:
            errors[name] = error_of(e)
    out["errors"] = errors
    return out


def disconnect(base_url: str) -> None:
    c = client(base_url)
    stream = c.completions.create(
        model=c.models.list().data[0].id,
        prompt="Once upon a time",
        max_tokens=4000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    seen = 0
    for chunk in stream:
        seen += sum(1 for ch in chunk.choices if ch.text)
        if seen >= 3:
            break
    stream.close()
    print("closed", flush=True)
    # Stay alive: the sequence must be freed by the closed stream, not by this process exiting.
    time.sleep(5)


def tls(base_url: str, ca: str) -> dict:
    # (the package's own HTTP client class, whichever library it is built on)
    http = openai.DefaultHttpxClient(verify=ca)
    deadline = time.time() + 60
    while True:
        try:
            if http.get(base_url.removesuffix("/v1") + "/health").status_code == 200:
                break
        except Exception:  # not listening yet (connection refused, reset)
            pass
        if time.time() > deadline:
            raise SystemExit("not healthy within 60 s")
        time.sleep(0.05)
    c = openai.OpenAI(base_url=base_url, api_key="sk-unused", max_retries=0, http_client=http)
    r = c.completions.create(model=c.models.list().data[0].id, prompt="Once upon a time", max_tokens=5)
    return {"text": r.choices[0].text, "completion_tokens": r.usage.completion_tokens}


def main() -> int:
    mode, base_url = sys.argv[1], sys.argv[2]
    if mode == "check":
        print(json.dumps(check(base_url, sys.argv[3], sys.argv[4], int(sys.argv[5]))))
    elif mode == "tls":
        print(json.dumps(tls(base_url, sys.argv[3])))
    elif mode == "disconnect":
        disconnect(base_url)
    else:
        print(f"unknown mode {mode}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
