#!/usr/bin/env bash
# Build the .deb: with cargo-deb when installed (metadata in Cargo.toml), otherwise by staging deploy/install.sh
# into a DESTDIR and packing it with dpkg-deb (no extra tools). Prints the package path.
#   deploy/build-deb.sh [OUT_DIR]       (binaries from $CARGO_TARGET_DIR/release; build them first)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${CARGO_TARGET_DIR:-target}/debian}
mkdir -p "$out"
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
if command -v cargo-deb >/dev/null; then
  cargo deb --no-build --output "$out" >/dev/null
  ls "$out"/pmkvq_*.deb | tail -1
  exit 0
fi
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
DESTDIR=$stage deploy/install.sh >/dev/null
# Config files are conffiles (dpkg keeps the operator's edits); state is created by systemd (StateDirectory).
rm -rf "$stage/var"
chmod 755 "$stage"
# Line tables are for our own profiling; the package ships stripped binaries.
command -v strip >/dev/null && strip --strip-debug "$stage/usr/bin/pmkvqd" "$stage/usr/bin/pmkvq"
mkdir -p "$stage/DEBIAN" "$stage/usr/share/pmkvq"
cp profiles/*.profile.json "$stage/usr/share/pmkvq/"
cat > "$stage/DEBIAN/control" <<CTL
Package: pmkvq
Version: $version
Architecture: $arch
Maintainer: pmkvq developers <dev@pmkvq.invalid>
Section: net
Priority: optional
Depends: libc6 (>= 2.31)
Description: LLM inference daemon with a live, progressive mixed-precision KV cache (PM-KVQ)
 pmkvqd streams tokens over gRPC and keeps every sequence inside a memory budget that follows the device,
 lowering KV precision per layer 16-8-4-2 bits; pmkvq is its client and offline toolbox.
CTL
printf '/etc/pmkvq/pmkvqd.toml\n/etc/pmkvq/pmkvqd.env.example\n' > "$stage/DEBIAN/conffiles"
cat > "$stage/DEBIAN/postinst" <<'SH'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi
SH
chmod 755 "$stage/DEBIAN/postinst"
deb="$out/pmkvq_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"
