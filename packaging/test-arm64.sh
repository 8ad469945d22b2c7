#!/usr/bin/env bash
# The arm64 proof, run by .ci/run after packaging/test-packages.sh has built both
# architectures (packaging/build.sh):
#   1. static: aarch64 ELF, highest GLIBC_ symbol ≤ 2.28, lintian and rpmlint as for x86-64;
#   2. under qemu-user, with one glibc — the multiarch libc6:arm64, never `-L` (docs/contributing.md, "arm64"):
#      a threaded C probe (a hang fails: it is a setup bug), tests/it/arm64.rs — `inventory --json`
#      on every fixture host (valid against the contract), `run --once` against a stand-in API
#      on loopback (token rotated and persisted), an aarch64 stub libnvidia-ml through the real
#      NVML bindings;
#   3. the binary-level test suite once more, against the aarch64 binary (EXALSIUS_TEST_BIN,
#      run by binfmt_misc; upper time bounds scaled by EXALSIUS_TEST_TIME_SCALE);
#   4. an arm64 Debian root (debootstrap --foreign, second stage under qemu; cached): the .deb
#      installs, creates its user, the binary runs there, `systemd-analyze verify` passes; then
#      that root booted with systemd-nspawn and the package checks of test-packages.sh.
# Needs root. Where `dpkg --add-architecture arm64` is impossible it says so and skips.
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
size_ceiling arm64 "$BIN"
audit_info arm64 "$BIN"
lint_packages arm64 "$DEB" "$RPM"
[ "$(dpkg-deb -f "$DEB" Architecture)" = arm64 ] || die "deb Architecture"
[ "$(rpm -qp --qf '%{ARCH}' "$RPM" 2>/dev/null)" = aarch64 ] || die "rpm arch"
ok "package metadata: Architecture arm64 / aarch64"

say "the arm64 binary under qemu-user"
# No -L /usr/aarch64-linux-gnu: it takes the cross toolchain's loader beside the multiarch
# libc6:arm64, two glibc builds whose private loader data differ, and threads hang.
QEMU=("$(command -v qemu-aarch64-static)")
"${QEMU[@]}" "$BIN" --version | grep -q '^exalsius-node-agent ' || die "--version under qemu"
printf '[api]\nurl = "https://api.example"\n' >"$WORK/agent.toml"
"${QEMU[@]}" "$BIN" --config "$WORK/agent.toml" check-config >/dev/null || die "check-config under qemu"
ok "under qemu: --version, check-config"
# Four threads and joins: a hang here is a setup bug (two glibc builds), never "not proven".
cat >"$WORK/t.c" <<'C'
#include <pthread.h>
static void *f(void *a) { return a; }
int main(void) {
  pthread_t t[4]; void *r; long sum = 0;
  for (long i = 0; i < 4; i++) if (pthread_create(&t[i], 0, f, (void *)i)) return 2;
  for (int i = 0; i < 4; i++) { pthread_join(t[i], &r); sum += (long)r; }
  return sum == 6 ? 0 : 1;
}
C
aarch64-linux-gnu-gcc -pthread -o "$WORK/t" "$WORK/t.c"
timeout 20 "${QEMU[@]}" "$WORK/t" \
  || die "threads under qemu-user: a 4-thread aarch64 program failed or hung ($(qemu-aarch64-static --version | head -1), kernel $(uname -r)); check that nothing sets QEMU_LD_PREFIX or -L"
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && timeout 20 "$WORK/t" \
  || die "binfmt_misc does not run aarch64 programs (packaging/arm64-tools.sh registers qemu-aarch64)"
ok "under qemu: a 4-thread aarch64 program runs, directly and through binfmt_misc"
started=$(date +%s)
EXALSIUS_ARM64_BIN=$PWD/$BIN EXALSIUS_ARM64_RUNNER="${QEMU[*]}" cargo test --locked --test it -- arm64:: --test-threads 2 \
  2>&1 | tee "$WORK/qemu-tests.txt"
grep -q 'test result: ok. 4 passed' "$WORK/qemu-tests.txt" || die "tests/it/arm64.rs under qemu"
ok "under qemu: inventory on 4 fixture hosts valid and equal to x86-64, run --once rotated and persisted the token, aarch64 stub NVML: 8 GPUs ($(( $(date +%s) - started )) s)"

say "the binary-level suite against the aarch64 binary"
# Every test file that drives the agent as a process, with the aarch64 binary (binfmt_misc
# hands it to qemu-user) and the aarch64 stub NVML (EXALSIUS_TEST_CC). Upper bounds on
# wall-clock gaps are multiplied by EXALSIUS_TEST_TIME_SCALE, never dropped. Left out, each
# with its reason:
#   reliability::soak_…, reliability::fifty_megabyte_…  measure the process's RSS (and fds):
#     under qemu those are qemu's (the translated code alone is more than the bound);
#   reliability::wall_clock_jumps_…  LD_PRELOADs the host's x86-64 libfaketime.
started=$(date +%s)
EXALSIUS_TEST_BIN=$PWD/$BIN EXALSIUS_TEST_TIME_SCALE=${EXALSIUS_TEST_TIME_SCALE:-5} EXALSIUS_TEST_CC=aarch64-linux-gnu-gcc \
  cargo test --locked --no-fail-fast \
    --test it -- cli:: credentials:: daemon:: doctor:: gpu:: import_legacy:: \
    metrics:: notify:: register:: reliability:: reload:: stall:: --test-threads 2 --skip soak_ --skip fifty_megabyte --skip wall_clock_jumps \
  >"$WORK/suite.txt" 2>&1 || true
grep -E '^test result:|FAILED|panicked' "$WORK/suite.txt" | head -40 || true
suite_passed=$(grep -oE '^test result: .* ([0-9]+) passed' "$WORK/suite.txt" | grep -oE '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
suite_failed=$(grep -oE '^test result: .* ([0-9]+) failed' "$WORK/suite.txt" | grep -oE '[0-9]+ failed' | awk '{s+=$1} END {print s+0}')
# One test crate: count the areas (modules of tests/it) that ran a test.
suite_files=$(grep -oE '^test [a-z_0-9]+::[^ ]+ \.\.\. ok' "$WORK/suite.txt" | cut -d: -f1 | sort -u | wc -l)
[ "$suite_failed" = 0 ] && [ "$suite_files" -ge 12 ] && [ "$suite_passed" -gt 0 ] \
  || { grep -B5 -A30 'panicked' "$WORK/suite.txt" | head -150; die "the binary-level suite against the aarch64 binary: $suite_passed passed, $suite_failed failed in $suite_files areas"; }
ok "the binary-level suite against the aarch64 binary: $suite_passed tests passed in $suite_files areas ($(( $(date +%s) - started )) s)"

say "an arm64 Debian root"
# systemd-sysv and dbus make it bootable (an older cache without them is made again).
if [ ! -x "$ROOT/usr/bin/dbus-daemon" ] || [ ! -e "$ROOT/sbin/init" ]; then
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE"
  started=$(date +%s)
  debootstrap --arch=arm64 --foreign --variant=minbase --include=systemd,systemd-sysv,dbus,procps,ca-certificates,passwd \
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
timeout 120 chroot "$ROOT" exalsius-node-agent inventory --json --gpu pci >"$WORK/inv.json" || die "inventory in the arm64 root"
python3 -c 'import json,sys; b=json.load(open(sys.argv[1])); assert b["hardware"]["cpu_cores"] >= 1, b' "$WORK/inv.json" \
  || die "inventory body"
ok "the installed arm64 binary runs there (--version, check-config with the packaged config, inventory --json)"
chroot "$ROOT" systemd-analyze verify --man=no /lib/systemd/system/exalsius-node-agent.service \
  >"$WORK/verify.out" 2>"$WORK/verify.err" || true
[ ! -s "$WORK/verify.err" ] || { cat "$WORK/verify.err"; die "systemd-analyze verify (arm64)"; }
ok "systemd-analyze verify (arm64 root): empty stderr"
chroot "$ROOT" dpkg --purge exalsius-node-agent >/dev/null 2>&1 || true
umount "$ROOT/proc"
MOUNTED=

say "the arm64 package in a booted systemd (nspawn through binfmt_misc + qemu-user)"
started=$(date +%s)
bash packaging/test-packages.sh --arch arm64 2>&1 | tee "$WORK/booted.txt"
[ "${PIPESTATUS[0]}" = 0 ] || die "the booted arm64 package checks"
booted=$(grep -cE '^ok   ' "$WORK/booted.txt" || true)
checks=$((checks + booted))
echo "booted arm64 checks: $booted in $(( $(date +%s) - started )) s"

say "done: $checks arm64 checks passed"
