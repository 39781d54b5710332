#!/usr/bin/env bash
# Cross-build for aarch64 (Jetson's CPU) with Debian's cross toolchain, and run the library's unit tests (the
# NEON kernels against the scalar specification) under qemu-user.
#   apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user && rustup target add aarch64-unknown-linux-gnu
#   scripts/cross-aarch64.sh [build|test]      (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/pmkvq-target}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
what=${1:-all}
if [[ $what == build || $what == all ]]; then
  cargo build --release --target aarch64-unknown-linux-gnu --bins
fi
if [[ $what == test || $what == all ]]; then
  cargo test --release --target aarch64-unknown-linux-gnu --lib
fi
