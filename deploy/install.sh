#!/usr/bin/env bash
# Install pmkvqd as a systemd service: binaries, unit, config, environment example, state directories.
#
#   deploy/install.sh                       # into / (then: systemctl enable --now pmkvqd)
#   DESTDIR=/tmp/stage deploy/install.sh    # staged (packaging); no systemctl calls
#   deploy/install.sh --uninstall [--purge] # remove binaries and unit; --purge also config and state
#
# BIN_DIR: where pmkvqd and pmkvq were built (default: $CARGO_TARGET_DIR/release or target/release).
# An existing /etc/pmkvq/pmkvqd.toml is kept; the new example goes beside it as pmkvqd.toml.new.
set -euo pipefail
cd "$(dirname "$0")/.."
DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-target}/release}
mode=install purge=0
for a in "$@"; do
  case $a in
    --uninstall) mode=uninstall ;;
    --purge) purge=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $a" >&2; exit 64 ;;
  esac
done
bin=$DESTDIR$PREFIX/bin
unit=$DESTDIR/lib/systemd/system/pmkvqd.service
etc=$DESTDIR/etc/pmkvq
state=$DESTDIR/var/lib/pmkvq
live() { [[ -z $DESTDIR ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; }

if [[ $mode == uninstall ]]; then
  live && systemctl disable --now pmkvqd.service 2>/dev/null || true
  rm -f "$bin/pmkvqd" "$bin/pmkvq" "$unit"
  if [[ $purge == 1 ]]; then rm -rf "$etc" "$state"; fi
  live && systemctl daemon-reload || true
  echo "pmkvqd uninstalled${DESTDIR:+ from $DESTDIR}"
  exit 0
fi

for b in pmkvqd pmkvq; do
  [[ -x $BIN_DIR/$b ]] || { echo "install.sh: $BIN_DIR/$b not found (cargo build --release first, or set BIN_DIR)" >&2; exit 66; }
  install -Dm755 "$BIN_DIR/$b" "$bin/$b"
done
install -Dm644 systemd/pmkvqd.service "$unit"
install -d -m755 "$etc"
if [[ -e $etc/pmkvqd.toml ]]; then
  install -m644 deploy/pmkvqd.example.toml "$etc/pmkvqd.toml.new"
else
  install -m644 deploy/pmkvqd.example.toml "$etc/pmkvqd.toml"
fi
install -m600 systemd/pmkvqd.env.example "$etc/pmkvqd.env.example"
install -d -m755 "$state" "$state/models" "$state/profiles"
for p in profiles/*.profile.json; do [[ -f $p ]] && install -m644 "$p" "$state/profiles/$(basename "$p")"; done
live && systemctl daemon-reload || true
echo "pmkvqd installed${DESTDIR:+ into $DESTDIR}. Put the model in $PREFIX/../var/lib/pmkvq/models (pmkvq fetch-model --dir /var/lib/pmkvq/models), then: systemctl enable --now pmkvqd"
