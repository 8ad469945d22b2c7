#!/usr/bin/env bash
# Two builds of one commit are the same bytes: packages (.deb, .rpm) and binaries, both
# architectures. Compares what packaging/build.sh left in target/packages and the binaries it
# packaged (the build test-packages.sh made) with a second build of the same commit in another clone —
# another path, another time, cold target directories. A difference fails with diffoscope's
# summary when it is installed, else the header fields and files that differ.
#   bash packaging/test-reproducible.sh
set -euo pipefail
cd "$(dirname "$0")/.."
die() { echo "FAIL reproducible: $*" >&2; exit 1; }
ok() { printf 'ok   %s\n' "$*"; }
[ -f target/packages/SHA256SUMS ] || die "no first build in target/packages (run packaging/build.sh)"
[ -z "$(git status --porcelain --untracked-files=no)" ] || die "the working tree has changes: commit them first (the second build is a clone of HEAD)"
second=$(mktemp -d /tmp/exalsius-reproducible-second-build.XXXXXX)
trap 'rm -rf "$second"' EXIT
git clone -q "$PWD" "$second/src"
git -C "$second/src" checkout -q "$(git rev-parse HEAD)"
started=$(date +%s)
(cd "$second/src" && bash packaging/build.sh "$second/out") >"$second/build.log" 2>&1 \
  || { tail -30 "$second/build.log"; die "second build"; }
echo "second build: $(( $(date +%s) - started )) s in $second/src"

# explain FIRST OTHER: what differs, without diffoscope — the header fields and the files.
explain() {
  case "$1" in
    *.deb)
      diff <(dpkg-deb -I "$1") <(dpkg-deb -I "$2") | head -20 || true
      diff <(dpkg-deb -c "$1") <(dpkg-deb -c "$2") | head -20 || true ;;
    *.rpm)
      diff <(rpm -qpi --dump "$1" 2>/dev/null) <(rpm -qpi --dump "$2" 2>/dev/null) | head -20 || true ;;
  esac
}
differ=0
for first in target/packages/*.deb target/packages/*.rpm; do
  name=$(basename "$first")
  other=$second/out/$name
  [ -f "$other" ] || die "$name: not built the second time"
  if cmp -s "$first" "$other"; then
    ok "$name: byte-identical in two builds ($(sha256sum "$first" | cut -c1-16)…)"
    continue
  fi
  differ=1
  echo "FAIL $name differs between the two builds"
  if command -v diffoscope >/dev/null 2>&1; then
    diffoscope --text - "$first" "$other" | head -60 || true
  else
    explain "$first" "$other"
  fi
done
for bin in target/x86_64-unknown-linux-gnu/release/exalsius-node-agent \
  target/arm64/aarch64-unknown-linux-gnu/release/exalsius-node-agent; do
  [ -f "$bin" ] || continue
  arch=$(file -b "$bin" | grep -q aarch64 && echo arm64 || echo amd64)
  if cmp -s "$bin" "$second/src/$bin"; then
    ok "$arch binary: byte-identical in two builds"
  else
    differ=1
    echo "FAIL $arch binary differs between the two builds"
  fi
done
[ "$differ" -eq 0 ] || die "two builds of $(git rev-parse --short HEAD) differ"
