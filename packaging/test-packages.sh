#!/usr/bin/env bash
# The proof for the unit and the packages, run by .ci/run: the phases under
# packaging/test/phases/, in the order of their numbers, over the shared library
# packaging/test/lib.sh. `--list` lists them. In short:
#   build, repos, rpm-signatures, static: the .deb and .rpm (and a -2 revision of the .deb for
#      the upgrade test) by packaging/build.sh; the previous release (packaging/previous-release,
#      cached); the signed apt and yum repositories of both (packaging/repo.sh, throw-away keys)
#      and badly signed copies; rpm -K and dnf against the signed RPM side; lintian, rpmlint,
#      the glibc symbol ceiling, rpm metadata, systemd-analyze security;
#   boot .. purge: a real systemd (Debian bookworm minbase, debootstrap, cached) booted with
#      systemd-nspawn and, as an operator would: install, configure, restart, reload, SIGKILL,
#      watchdog, journal, GPUs, metrics, upgrade, purge;
#   takeover, rpm, fleet: client-hw-info taken over on install; the .rpm with rpm -i --nodeps
#      in the same container; a fleet host: badly signed repositories refused, the previous
#      release installed from the signed apt repository, upgraded while running, rolled back and
#      upgraded again, the token chain unbroken at the stand-in API.
# A stand-in for the API runs on the host's 127.0.0.1, which the container shares.
# Cleans up what it started. Needs root.
#
#   bash packaging/test-packages.sh                 every phase, for x86-64
#   bash packaging/test-packages.sh --list          the phases: number, name, needs, what it proves
#   bash packaging/test-packages.sh --only reload   one phase (a name, a number or NN-name); a
#       comma list runs several, in phase order. What a phase declares on its "# needs:" line
#       is made first, reusing what is there: the packages in target/packages (--only build
#       makes them again), the repositories in target/packages/repos, a booted container, the
#       package installed, configured and heartbeating.
#   bash packaging/test-packages.sh --arch arm64    the booted-systemd phases for the arm64 .deb
#       (built before by packaging/build.sh), in the arm64 root that packaging/test-arm64.sh
#       makes, booted through binfmt_misc + qemu-user; waits are scaled by TIME_SCALE (default
#       5 there). A phase with an "# arm64: skip" line is skipped there, the reason printed:
#       the static checks (test-arm64.sh does them), the GPUs, the metrics drop-in, the upgrade,
#       the client-hw-info takeover, the .rpm and the repositories — architecture-independent,
#       proven on x86-64.
# docs/contributing.md "Package test" says how to add a phase.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH=amd64
only=
list=
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH=${2:-}; shift 2 ;;
    --only) only=${2:-}; [ -n "$only" ] || { echo "--only needs a phase (--list lists them)" >&2; exit 2; }; shift 2 ;;
    --list) list=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (--arch amd64|arm64, --only PHASE[,PHASE...], --list)" >&2; exit 2 ;;
  esac
done
case "$ARCH" in amd64 | arm64) ;; *) echo "--arch amd64|arm64, not $ARCH" >&2; exit 2 ;; esac

PHASES=(packaging/test/phases/[0-9][0-9]-*.sh)
phase_name() { local b=${1##*/}; b=${b%.sh}; echo "${b#[0-9][0-9]-}"; }
phase_field() { sed -n "s/^# $2: \{0,1\}//p" "$1" | head -1; } # FILE FIELD: its "# FIELD: ..." line

# Each phase says what it proves and needs only what lib.sh can make: checked before anything runs.
for f in "${PHASES[@]}"; do
  [ -n "$(phase_field "$f" about)" ] || { echo "$f has no '# about:' line" >&2; exit 1; }
  grep -q '^# needs:' "$f" || { echo "$f has no '# needs:' line" >&2; exit 1; }
  for need in $(phase_field "$f" needs); do
    grep -q "^need_$need() {" packaging/test/lib.sh || { echo "$f needs '$need': packaging/test/lib.sh has no need_$need" >&2; exit 1; }
  done
done
if [ -n "$list" ]; then
  for f in "${PHASES[@]}"; do
    b=${f##*/}
    printf '%-20s needs: %-22s %s\n' "${b%.sh}" "$(phase_field "$f" needs)" "$(phase_field "$f" about)"
  done
  exit 0
fi

# The phases to run: every one, or those --only names (by name, number or NN-name), in phase order.
selected=()
if [ -n "$only" ]; then
  IFS=, read -ra wanted <<<"$only"
  for w in "${wanted[@]}"; do
    match=
    for f in "${PHASES[@]}"; do
      b=${f##*/}
      case "$w" in "$(phase_name "$f")" | "${b:0:2}" | "${b%.sh}") match=$f ;; esac
    done
    [ -n "$match" ] || { echo "no phase '$w'; the phases: $(for f in "${PHASES[@]}"; do printf '%s ' "$(phase_name "$f")"; done)" >&2; exit 2; }
  done
  for f in "${PHASES[@]}"; do
    b=${f##*/}
    for w in "${wanted[@]}"; do
      case "$w" in "$(phase_name "$f")" | "${b:0:2}" | "${b%.sh}") selected+=("$f"); break ;; esac
    done
  done
else
  selected=("${PHASES[@]}")
fi

. packaging/test/lib.sh
trap cleanup EXIT

# run_phase NAME: the phase NAME, after what it needs (lib.sh's need_* also call it to make a need).
run_phase() {
  local f need
  for f in "${PHASES[@]}"; do [ "$(phase_name "$f")" = "$1" ] && break; done
  [ "$(phase_name "$f")" = "$1" ] || die "no phase $1"
  if [ "$ARCH" != amd64 ] && grep -q '^# arm64: skip ' "$f"; then
    printf 'skip %s (arm64): %s\n' "$(phase_name "$f")" "$(phase_field "$f" arm64 | sed 's/^skip //')"
    return 0
  fi
  for need in $(phase_field "$f" needs); do "need_$need"; done
  . "$f"
}

say "tools"
need_tools
for f in "${selected[@]}"; do
  run_phase "$(phase_name "$f")"
done

say "done: $checks checks passed ($ARCH)${only:+, phases $only}"
