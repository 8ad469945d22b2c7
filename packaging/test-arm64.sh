#!/usr/bin/env bash
# The arm64 proof, run by .ci/run after packaging/test-packages.sh has built both
# architectures (packaging/build.sh):
#   1. static: aarch64 ELF, highest GLIBC_ symbol ≤ 2.28, lintian and rpmlint as for x86-64;
#   2. under qemu-user (binfmt_misc): tests/arm64.rs — `inventory --json` on every fixture host
#      (valid against the contract), `run --once` against a stand-in API on loopback (token
#      rotated and persisted), an aarch64 stub libnvidia-ml through the real NVML bindings;
#   3. an arm64 Debian root (debootstrap --foreign, second stage under qemu; cached): the .deb
#      installs, creates its user, the binary runs there, `systemd-analyze verify` passes.
# Booting systemd under emulation is not attempted (see README). Needs root. Where
# `dpkg --add-architecture arm64` is impossible it says so and skips, never silently.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=${1:-$PWD/target/packages}
CACHE=${EXALSIUS_CI_CACHE:-/var/cache/exalsius-ci}
ROOT=$CACHE/bookworm-arm64-root
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d)
MOUNTED=
cleanup() {
  set +e
  [ -n "$MOUNTED" ] && umount "$ROOT/proc" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
checks=0
say() { printf '\n== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf 'ok   %s\n' "$*"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

say "arm64 tools"
bash packaging/arm64-tools.sh || { echo "arm64: SKIPPED: the cross toolchain cannot be installed here (see above)"; exit 0; }

DEB=$(ls "$PKG"/exalsius-node-agent_*-1_arm64.deb)
RPM=$(ls "$PKG"/exalsius-node-agent-*.aarch64.rpm)
BIN=target/arm64/aarch64-unknown-linux-gnu/release/exalsius-node-agent
[ -x "$BIN" ] || die "no arm64 binary at $BIN (packaging/build.sh builds it)"

say "static checks"
file -b "$BIN" | grep -q 'ARM aarch64' || die "not an aarch64 executable: $(file -b "$BIN")"
ok "$(basename "$DEB"), $(basename "$RPM"): an aarch64 ELF executable inside"
. packaging/checks.sh
glibc_ceiling arm64 "$BIN"
audit_info arm64 "$BIN"
lint_packages arm64 "$DEB" "$RPM"
[ "$(dpkg-deb -f "$DEB" Architecture)" = arm64 ] || die "deb Architecture"
[ "$(rpm -qp --qf '%{ARCH}' "$RPM" 2>/dev/null)" = aarch64 ] || die "rpm arch"
ok "package metadata: Architecture arm64 / aarch64"

say "the arm64 binary under qemu-user"
QEMU=("$(command -v qemu-aarch64-static)" -L /usr/aarch64-linux-gnu)
"${QEMU[@]}" "$BIN" --version | grep -q '^exalsius-node-agent ' || die "--version under qemu"
printf '[api]\nurl = "https://api.example"\n' >"$WORK/agent.toml"
"${QEMU[@]}" "$BIN" --config "$WORK/agent.toml" check-config >/dev/null || die "check-config under qemu"
ok "under qemu: --version, check-config (single-threaded commands)"
# Everything else starts threads. On some kernels qemu-user hangs at the first pthread_create
# of any aarch64 program; probe with six lines of C before relying on it.
printf '#include <pthread.h>\nstatic void *f(void *a) { return a; }\nint main(void) { pthread_t t; void *r; pthread_create(&t, 0, f, (void *)7); pthread_join(t, &r); return r == (void *)7 ? 0 : 1; }\n' >"$WORK/t.c"
aarch64-linux-gnu-gcc -pthread -o "$WORK/t" "$WORK/t.c"
threads_ok=0
if timeout 20 "${QEMU[@]}" "$WORK/t"; then
  threads_ok=1
  EXALSIUS_ARM64_BIN=$PWD/$BIN EXALSIUS_ARM64_RUNNER="${QEMU[*]}" cargo test --locked --test arm64 -- --test-threads 2 \
    2>&1 | tee "$WORK/qemu-tests.txt"
  grep -q 'test result: ok. 4 passed' "$WORK/qemu-tests.txt" || die "tests/arm64.rs under qemu"
  ok "under qemu: inventory on 4 fixture hosts valid and equal to x86-64, run --once rotated and persisted the token, aarch64 stub NVML: 8 GPUs"
else
  echo "qemu-user: NOT PROVEN HERE: a two-thread aarch64 C program hangs under $(qemu-aarch64-static --version | head -1) on kernel $(uname -r); tests/arm64.rs (inventory on fixture hosts, run --once, stub NVML) needs threads and is not run"
fi

say "an arm64 Debian root"
if [ ! -x "$ROOT/usr/bin/apt-get" ]; then
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE"
  started=$(date +%s)
  debootstrap --arch=arm64 --foreign --variant=minbase --include=systemd,procps,ca-certificates,passwd \
    bookworm "$ROOT.tmp" "$MIRROR" >"$WORK/debootstrap1.log" 2>&1 || { tail -20 "$WORK/debootstrap1.log"; die "debootstrap --foreign"; }
  chroot "$ROOT.tmp" /debootstrap/debootstrap --second-stage >"$WORK/debootstrap2.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap2.log"; die "debootstrap --second-stage under qemu"; }
  mv "$ROOT.tmp" "$ROOT"
  echo "arm64 root made in $(( $(date +%s) - started )) s (cached in $ROOT)"
fi
[ "$(chroot "$ROOT" dpkg --print-architecture)" = arm64 ] || die "root is not arm64"
ok "arm64 Debian bookworm root (debootstrap --foreign + second stage under qemu)"
mount --bind /proc "$ROOT/proc"
MOUNTED=1
cp "$DEB" "$ROOT/tmp/agent.deb"
chroot "$ROOT" dpkg --purge exalsius-node-agent >/dev/null 2>&1 || true
chroot "$ROOT" env DEBIAN_FRONTEND=noninteractive dpkg -i /tmp/agent.deb >"$WORK/dpkg.log" 2>&1 \
  || { cat "$WORK/dpkg.log"; die "dpkg -i (arm64)"; }
chroot "$ROOT" getent passwd exalsius-agent >/dev/null || die "postinst did not create the user"
[ "$(chroot "$ROOT" stat -c '%a %U' /var/lib/exalsius-node-agent)" = "700 exalsius-agent" ] || die "state dir"
ok "arm64 .deb installs: user exalsius-agent, state directory 0700 exalsius-agent"
chroot "$ROOT" exalsius-node-agent --version | grep -q '^exalsius-node-agent ' || die "--version"
chroot "$ROOT" exalsius-node-agent check-config >/dev/null || die "check-config in the arm64 root"
if [ "$threads_ok" = 1 ]; then
  timeout 120 chroot "$ROOT" exalsius-node-agent inventory --json --gpu pci >"$WORK/inv.json" || die "inventory in the arm64 root"
  python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); assert b["hardware"]["cpu_cores"] >= 1, b' "$WORK/inv.json" \
    || die "inventory body"
  ok "the installed arm64 binary runs there (--version, check-config with the packaged config, inventory --json)"
else
  ok "the installed arm64 binary runs there (--version, check-config with the packaged config; inventory needs threads, see above)"
fi
chroot "$ROOT" systemd-analyze verify --man=no /lib/systemd/system/exalsius-node-agent.service \
  >"$WORK/verify.out" 2>"$WORK/verify.err" || true
[ ! -s "$WORK/verify.err" ] || { cat "$WORK/verify.err"; die "systemd-analyze verify (arm64)"; }
ok "systemd-analyze verify (arm64 root): empty stderr"
chroot "$ROOT" dpkg --purge exalsius-node-agent >/dev/null 2>&1 || true

say "done: $checks arm64 checks passed"
