#!/usr/bin/env bash
# Fetch real chat templates (the Jinja files llama.cpp keeps in models/templates, as the model publishers ship
# them: Qwen3, the DeepSeek-R1 distills, Llama 3, Gemma, Mistral, ...) into DEST (default models/templates), for
# tests/chat_templates.rs and tests/thinking.rs. They come from the llama-cpp-python source package on the Python
# registry (checked by sha256) and are never committed: each belongs to its model's publisher.
# Idempotent: a complete earlier fetch (its stamp names the same package) is kept. Prints DEST.
#
#   scripts/fetch-chat-templates.sh [DEST]
set -euo pipefail
dest=${1:-models/templates}
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
stamp="$dest/.fetched-from"
if [[ -f $stamp && $(cat "$stamp") == "llama-cpp-python==$VERSION $SHA256" ]]; then echo "$dest"; exit 0; fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary llama-cpp-python \
  "llama-cpp-python==$VERSION" -d "$work" >&2
sdist="$work/llama_cpp_python-$VERSION.tar.gz"
got=$(sha256sum "$sdist" | cut -d' ' -f1)
[[ $got == "$SHA256" ]] || { echo "fetch-chat-templates: $sdist has sha256 $got, expected $SHA256" >&2; exit 65; }
tar -xzf "$sdist" -C "$work" --wildcards "llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates/*.jinja"
src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp/models/templates"
n=$(find "$src" -name '*.jinja' | wc -l)
(( n > 0 )) || { echo "fetch-chat-templates: no templates in $sdist" >&2; exit 65; }
mkdir -p "$dest"
cp "$src"/*.jinja "$dest/"
echo "llama-cpp-python==$VERSION $SHA256" > "$stamp"
echo "fetch-chat-templates: $n templates in $dest" >&2
echo "$dest"
