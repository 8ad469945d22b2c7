# shellcheck shell=bash disable=SC2034 # the globals are the phases'
# The package test's shared library, sourced by packaging/test-packages.sh (the driver) before
# the phases under packaging/test/phases/. It holds what more than one phase uses: the output
# (say/ok/die), the packages and the repositories, the booted container and the stand-in API on
# the host's 127.0.0.1 (which the container shares), the heartbeat helpers that read the
# stand-in's log, and the GPU stub. Each need_* makes what a phase declares on its "# needs:"
# line, reusing what is there already: a full run finds everything made by the phase before.
# Globals: ARCH PKG CACHE ROOT TIME_SCALE WORK API_LOG; DEB DEB2 RPM (need_packages); REPOS
# PREV_VERSION PREV_DEB PREV_RPM (need_repos); port CPID (need_container).

TEST_DIR=packaging/test
FILES=$TEST_DIR/files
PKG=$PWD/target/packages
CACHE=${EXALSIUS_CI_CACHE:-/var/cache/exalsius-ci}
if [ "$ARCH" = amd64 ]; then
  ROOT=$CACHE/bookworm-root
  TIME_SCALE=${TIME_SCALE:-1}
else
  ROOT=$CACHE/bookworm-arm64-root
  TIME_SCALE=${TIME_SCALE:-5}
fi
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The stand-in's nodes and tokens (packaging/standin_api.py knows the same ones).
NODE=3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b
BOOT=bootstrap-SECRET-token-42
REGTOKEN=register-SECRET-token-7
REG_NODE=5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d
LEGACY_NODE=9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a
LEGACY_TOKEN=legacy-SECRET-token-9
FLEET_NODE=7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f
FLEET_TOKEN=fleet-SECRET-token-5
WORK=$(mktemp -d)
API_LOG=$WORK/api.jsonl
REPOS=$PKG/repos
checks=0
DEB='' DEB2='' RPM='' PREV_VERSION='' port='' CPID='' NSPAWN_PID='' STANDIN_PID=''

say() { printf '\n== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf 'ok   %s%s\n' "$*" "$([ "$ARCH" = amd64 ] || echo " [$ARCH, booted under qemu-user]")"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }
show() { cat "$@" >&2; } # FILE...: what a failing command printed, before die

cleanup() {
  set +e
  if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
    nsenter -t "$CPID" -a systemctl poweroff >/dev/null 2>&1
    for _ in $(seq 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  [ -n "$NSPAWN_PID" ] && kill "$NSPAWN_PID" 2>/dev/null
  [ -n "$STANDIN_PID" ] && kill "$STANDIN_PID" 2>/dev/null
  rm -rf "$WORK"
}

# until_true TENTHS CMD...: CMD succeeds within TENTHS tenths of a second (times TIME_SCALE).
until_true() {
  local n=$1
  shift
  for _ in $(seq $((n * TIME_SCALE))); do "$@" && return 0; sleep 0.1; done
  return 1
}

# tamper FILE: one byte of the payload changed, the size kept (what apt and rpm must catch).
tamper() { printf 'X' | dd of="$1" bs=1 seek=$(($(stat -c %s "$1") - 4096)) conv=notrunc 2>/dev/null; }

need_tools() {
  local missing=()
  for tool in lintian:lintian rpmlint:rpmlint debootstrap:debootstrap systemd-nspawn:systemd-container \
              rpm:rpm objdump:binutils nsenter:util-linux apt-ftparchive:apt-utils createrepo_c:createrepo-c \
              dnf:dnf gpg:gnupg gpgv:gpgv; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# --- packages ---------------------------------------------------------------------------------

# find_packages: DEB DEB2 RPM from what packaging/build.sh left in $PKG; false if one is missing.
find_packages() {
  if [ "$ARCH" = arm64 ]; then
    DEB=$(ls "$PKG"/exalsius-node-agent_*-1_arm64.deb 2>/dev/null) || return 1
    return 0
  fi
  DEB=$(ls "$PKG"/exalsius-node-agent_*-1_amd64.deb 2>/dev/null) \
    && DEB2=$(ls "$PKG"/upgrade/exalsius-node-agent_*-2_amd64.deb 2>/dev/null) \
    && RPM=$(ls "$PKG"/exalsius-node-agent-*.x86_64.rpm 2>/dev/null) \
    && [ -x target/assets/exalsius-node-agent ]
}
need_packages() {
  [ -n "$DEB" ] && return 0
  if find_packages; then
    echo "packages: reusing $(basename "$DEB") in $PKG (built $(date -r "$DEB" '+%F %T'); --only build makes them again)"
  elif [ "$ARCH" = arm64 ]; then
    die "no arm64 .deb in $PKG (packaging/build.sh --arch arm64 builds it)"
  else
    run_phase build
  fi
}

# need_repos: the signed repositories of the packages under test; made again when they hold
# other packages (a build since).
need_repos() {
  need_packages
  [ -n "$PREV_VERSION" ] && return 0
  previous_release
  if cmp -s "$DEB" "$REPOS/good/apt/pool/main/$(basename "$DEB")" 2>/dev/null && [ -d "$REPOS/tampered" ]; then
    echo "repositories: reusing $REPOS (--only repos makes them again)"
  else
    run_phase repos
  fi
}

# previous_release: PREV_VERSION PREV_DEB PREV_RPM — the release before this one
# (packaging/previous-release), built from its commit by its own packaging/build.sh once per
# machine and cached: the upgrade → rollback test installs it from the repository.
previous_release() {
  [ -n "$PREV_VERSION" ] && return 0
  local commit prev
  read -r PREV_VERSION commit < <(grep -v '^#' packaging/previous-release)
  prev=$CACHE/previous-release/$commit
  if ! compgen -G "$prev/exalsius-node-agent_${PREV_VERSION}-1_amd64.deb" >/dev/null; then
    git cat-file -e "$commit^{commit}" 2>/dev/null \
      || die "the previous release's commit $commit is not in this clone (a shallow clone? git fetch --unshallow)"
    git clone -q "$PWD" "$WORK/prev" && git -C "$WORK/prev" -c advice.detachedHead=false checkout -q "$commit"
    rm -rf "$prev.tmp"
    (cd "$WORK/prev" && bash packaging/build.sh --arch amd64 "$prev.tmp") >"$WORK/build-prev.log" 2>&1 \
      || { tail -30 "$WORK/build-prev.log"; die "build of the previous release $PREV_VERSION ($commit)"; }
    rm -rf "$prev" "$WORK/prev"
    mv "$prev.tmp" "$prev"
  fi
  PREV_DEB=$(ls "$prev"/exalsius-node-agent_"$PREV_VERSION"-1_amd64.deb)
  PREV_RPM=$(ls "$prev"/exalsius-node-agent-"$PREV_VERSION"-1.x86_64.rpm)
}

# --- the booted container and the stand-in API ------------------------------------------------

need_container() {
  if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then return 0; fi
  run_phase boot
}

# boot_container: the stand-in API on 127.0.0.1:$port, then a real systemd booted in an
# ephemeral snapshot (-x) of the cached Debian root, $PKG bound read-only at /mnt/pkg.
boot_container() {
  if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
    [ "$ARCH" = amd64 ] || die "no bootable arm64 root at $ROOT (packaging/test-arm64.sh makes it)"
    rm -rf "$ROOT.tmp"
    mkdir -p "$CACHE"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,ca-certificates,rpm,passwd \
      bookworm "$ROOT.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
    mv "$ROOT.tmp" "$ROOT"
  fi
  [ -x "$ROOT/usr/bin/dbus-daemon" ] || die "no bootable $ARCH root at $ROOT (no dbus-daemon)"
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  python3 packaging/standin_api.py "$port" "$API_LOG" "$NODE" "$BOOT" "$REGTOKEN" &
  STANDIN_PID=$!
  touch "$API_LOG"
  # A pure cgroup v2 tree for the container, and bpf() allowed in it: systemd applies
  # DevicePolicy= and DeviceAllow= as BPF device programs there (in nspawn's default hybrid tree
  # the v1 devices controller is read-only, the unit's device policy would silently not apply,
  # and the GPU checks would prove nothing).
  SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$ROOT" -x --boot --register=no --keep-unit \
    --console=passive -M "agenttest-$$" --system-call-filter=bpf --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN \
    --bind-ro="$PKG":/mnt/pkg >"$WORK/nspawn.log" 2>&1 &
  NSPAWN_PID=$!
  # -x copies the root first where the file system cannot snapshot it (ext4: ~400 MB), which on
  # a loaded machine takes more than a few seconds.
  for _ in $(seq $((1200 * TIME_SCALE))); do
    CPID=$(pgrep -P "$NSPAWN_PID" -x systemd || true)
    [ -n "$CPID" ] && break
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.1
  done
  [ -n "$CPID" ] || { cat "$WORK/nspawn.log"; die "container did not boot"; }
  local state=
  for _ in $(seq $((120 * TIME_SCALE))); do
    # Early on the container's bus is not up yet: "Failed to connect to bus".
    state=$(timeout 60 nsenter -t "$CPID" -a systemctl is-system-running --wait 2>/dev/null || true)
    case "$state" in running | degraded) break ;; esac
    sleep 0.25
  done
  case "$state" in running | degraded) ;; *) die "container system state: $state" ;; esac
  ok "container booted: systemd $state"
  if [ "$ARCH" = arm64 ]; then
    # Emulation limits, not the unit's: qemu-user runs threads of its own, so the kernel refuses
    # the emulated systemd's unshare(CLONE_NEWUSER) (EINVAL, "Failed to set up user namespacing")
    # and its IPC-namespace set-up fails (EIO). Only these two, and only under qemu-user; on
    # arm64 hardware the unit runs as shipped (the same file as on x86-64).
    drop_in qemu-user.conf
    echo "arm64 under qemu-user: the unit runs with PrivateUsers=no and PrivateIPC=no (qemu-user cannot emulate them)"
  fi
}

inside() { nsenter -t "$CPID" -a "$@"; }
# put DEST [MODE]: stdin becomes the container's file DEST.
put() { inside sh -c "cat > '$1'${2:+ && chmod $2 '$1'}"; }
# render FILE: packaging/test/files/FILE with @PORT@ @NODE@ @BOOT@ @LEGACY_NODE@ @LEGACY_TOKEN@
# @FLEET_NODE@ @FLEET_TOKEN@ @INTERVAL@ filled in.
render() {
  sed -e "s|@PORT@|$port|g; s|@NODE@|$NODE|g; s|@BOOT@|$BOOT|g; s|@INTERVAL@|${INTERVAL:-1s}|g" \
      -e "s|@LEGACY_NODE@|$LEGACY_NODE|g; s|@LEGACY_TOKEN@|$LEGACY_TOKEN|g" \
      -e "s|@FLEET_NODE@|$FLEET_NODE|g; s|@FLEET_TOKEN@|$FLEET_TOKEN|g" "$FILES/$1"
}
UNIT_D=/etc/systemd/system/exalsius-node-agent.service.d
# drop_in NAME: packaging/test/files/dropin-NAME as the unit's drop-in NAME (daemon-reload is the caller's).
drop_in() { inside mkdir -p "$UNIT_D"; put "$UNIT_D/$1" <"$FILES/dropin-$1"; }
journal() { inside journalctl -u exalsius-node-agent --no-pager "$@"; }
journal_tail() { journal | tail -"${1:-20}" >&2; }

# --- the service and the stand-in's log -------------------------------------------------------

svc() { inside systemctl show -p "$1" --value exalsius-node-agent; }
wait_prop() { # PROP VALUE TIMEOUT_S
  for _ in $(seq $(($3 * 10 * TIME_SCALE))); do [ "$(svc "$1")" = "$2" ] && return 0; sleep 0.1; done
  die "$1 is $(svc "$1"), expected $2"
}
# wait_new_pid OLD TENTHS [active]: MainPID is another, non-zero one (and the unit active); sets new.
wait_new_pid() {
  for _ in $(seq $(($2 * TIME_SCALE))); do
    new=$(svc MainPID)
    [ "$new" != 0 ] && [ "$new" != "$1" ] && { [ -z "${3:-}" ] || [ "$(svc ActiveState)" = active ]; } && return 0
    sleep 0.1
  done
  return 1
}
requests() { wc -l <"$API_LOG"; }
wait_requests() { # N TIMEOUT_S
  for _ in $(seq $(($2 * 10 * TIME_SCALE))); do [ "$(requests)" -ge "$1" ] && return 0; sleep 0.1; done
  die "expected $1 requests at the stand-in, got $(requests)"
}
apilog() { python3 "$TEST_DIR/apilog.py" "$1" "$API_LOG" "${@:2}"; } # CHECK ARGS...: see apilog.py
installed() { inside dpkg-query -W -f '${db:Status-Status} ${Version}' exalsius-node-agent 2>/dev/null || true; }

# configure INTERVAL: the agent's config for NODE with the configured token BOOT.
configure() { INTERVAL=$1 render agent-node.toml | put /etc/exalsius/node-agent.toml; }
# operator_config: api.url only, as config management puts it before register or an import.
operator_config() { inside mkdir -p /etc/exalsius; render agent-url-only.toml | put /etc/exalsius/node-agent.toml; }

need_installed() {
  need_packages
  need_container
  case "$(installed)" in installed*) return 0 ;; esac
  inside apt-get install -y -q /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-need.log" 2>&1 || { show "$WORK/apt-need.log"; die "apt-get install"; }
}
# need_configured: installed, configured for NODE, heartbeating.
need_configured() {
  need_installed
  inside grep -q "127.0.0.1:$port" /etc/exalsius/node-agent.toml 2>/dev/null && return 0
  configure 1s
  inside systemctl restart exalsius-node-agent
  wait_requests $(($(requests) + 2)) 10
}
# need_absent: no agent package installed (the .deb purged, the .rpm erased).
need_absent() {
  need_container
  case "$(installed)" in installed*) inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge" ;; esac
  if inside rpm -q exalsius-node-agent >/dev/null 2>&1; then inside rpm -e exalsius-node-agent >/dev/null 2>&1 || die "rpm -e"; fi
  return 0
}

# --- GPUs: a stub NVML and nvidia-smi, device nodes, /proc/devices ----------------------------

# need_gpu_stub: the stub libnvidia-ml (tests/support/fake_nvml.c, open_devices=1) and nvidia-smi
# (tests/support/fake_nvidia_smi.c) in the container; they open /dev/nvidiactl and
# /dev/nvidia<i> as the real ones do: refused (EPERM) by a device policy; ENXIO (no driver
# behind the node) counts as an answer. The agent's config points at the library.
need_gpu_stub() {
  need_configured
  if ! inside test -x /usr/bin/nvidia-smi; then
    cc -shared -fPIC -O1 -Wall -Werror -o "$WORK/libnvidia-ml.so.1" tests/support/fake_nvml.c
    cc -O1 -Wall -Werror -o "$WORK/nvidia-smi" tests/support/fake_nvidia_smi.c
    inside mkdir -p /opt/fake-nvidia
    put /opt/fake-nvidia/libnvidia-ml.so.1 <"$WORK/libnvidia-ml.so.1"
    put /usr/bin/nvidia-smi 755 <"$WORK/nvidia-smi"
    put /opt/fake-nvidia/fake_nvml.conf <"$FILES/fake_nvml.conf"
  fi
  inside grep -q '^\[inventory\]' /etc/exalsius/node-agent.toml || inside sh -c 'cat >> /etc/exalsius/node-agent.toml' <"$FILES/agent-inventory.toml"
}
nodes() { # create | remove: /dev/nvidiactl, /dev/nvidia0, /dev/nvidia1 as the driver makes them (0666)
  if [ "$1" = create ]; then
    inside sh -c 'mknod -m 666 /dev/nvidiactl c 195 255; mknod -m 666 /dev/nvidia0 c 195 0; mknod -m 666 /dev/nvidia1 c 195 1' 2>/dev/null || true
  else
    inside rm -f /dev/nvidiactl /dev/nvidia0 /dev/nvidia1
  fi
}
devices() { # 550 | 535 | none: the container's /proc/devices, as a driver of that generation lists major 195
  inside sh -c 'while grep -q " /proc/devices " /proc/self/mounts; do umount /proc/devices || break; done'
  [ "$1" = none ] && return 0
  # packaging/test/files/majors-GEN goes inside the "Character devices:" block: an empty line
  # ends it for systemd's parser.
  put "/run/nvidia-majors.$1" <"$FILES/majors-$1"
  inside sh -c "awk -v f=/run/nvidia-majors.$1 '{print} /^Character devices:/{while ((getline l < f) > 0) print l}' /proc/devices >/run/devices.$1 && mount --bind /run/devices.$1 /proc/devices"
  inside grep -q '^195 nvidia' /proc/devices || die "fake /proc/devices ($1) not in place"
}
last_gpus() { apilog last-gpu; } # "count|type|nvidia" of the newest heartbeat body
