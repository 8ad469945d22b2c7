#!/usr/bin/env bash
# The proof for the unit and the packages, run by .ci/run:
#   1. build the .deb and .rpm (and a -2 revision of the .deb for the upgrade test);
#   2. lintian, rpmlint, the glibc symbol ceiling, rpm metadata, systemd-analyze security;
#   3. boot a real systemd (Debian bookworm minbase, debootstrap, cached) with systemd-nspawn
#      and, as an operator would: install, configure, restart, reload, SIGKILL, watchdog,
#      journal, upgrade, purge; then the .rpm with rpm -i --nodeps in the same container.
# A stand-in for the API runs on the host's 127.0.0.1, which the container shares.
# Cleans up what it started. Needs root.
#
#   bash packaging/test-packages.sh                 all of the above for x86-64
#   bash packaging/test-packages.sh --arch arm64    the booted-systemd checks for the arm64 .deb
#       (built before by packaging/build.sh), in the arm64 root that packaging/test-arm64.sh
#       makes, booted through binfmt_misc + qemu-user; waits are scaled by TIME_SCALE (default
#       5 there). Skipped there, with the reason printed: the static checks (test-arm64.sh does
#       them), the metrics drop-in, the upgrade, the client-hw-info takeover and the .rpm —
#       architecture-independent scripts already proven on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH=amd64
if [ "${1:-}" = --arch ]; then
  ARCH=$2
  shift 2
fi
case "$ARCH" in amd64 | arm64) ;; *) echo "--arch amd64|arm64, not $ARCH" >&2; exit 2 ;; esac
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
NODE=3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b
BOOT=bootstrap-SECRET-token-42
REGTOKEN=register-SECRET-token-7
REG_NODE=5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d
LEGACY_NODE=9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a
LEGACY_TOKEN=legacy-SECRET-token-9
WORK=$(mktemp -d)
API_LOG=$WORK/api.jsonl
checks=0

say() { printf '\n== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf 'ok   %s%s\n' "$*" "$([ "$ARCH" = amd64 ] || echo " [$ARCH, booted under qemu-user]")"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

STANDIN_PID=
NSPAWN_PID=
CPID=
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
trap cleanup EXIT

say "tools"
missing=()
for tool in lintian:lintian rpmlint:rpmlint debootstrap:debootstrap systemd-nspawn:systemd-container \
            rpm:rpm objdump:binutils nsenter:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

amd64_only() { # WHAT: true on x86-64; on arm64 says why the section is skipped
  [ "$ARCH" = amd64 ] && return 0
  printf 'skip %s (arm64): architecture-independent, proven by the x86-64 run\n' "$1"
  return 1
}

if [ "$ARCH" = amd64 ]; then
say "build"
rm -rf "$PKG"
bash packaging/build.sh "$PKG" >"$WORK/build1.log" 2>&1 || { cat "$WORK/build1.log"; die "build"; }
DEB_REVISION=2 bash packaging/build.sh --arch amd64 "$PKG/upgrade" >"$WORK/build2.log" 2>&1 || { cat "$WORK/build2.log"; die "build -2"; }
DEB=$(ls "$PKG"/exalsius-node-agent_*-1_amd64.deb)
DEB2=$(ls "$PKG"/upgrade/exalsius-node-agent_*-2_amd64.deb)
RPM=$(ls "$PKG"/exalsius-node-agent-*.x86_64.rpm)
ok "built $(basename "$DEB"), $(basename "$DEB2"), $(basename "$RPM")"

say "static checks"
. packaging/checks.sh
lint_packages amd64 "$DEB" "$RPM"
glibc_ceiling amd64 target/assets/exalsius-node-agent
size_ceiling amd64 target/assets/exalsius-node-agent
audit_info amd64 target/assets/exalsius-node-agent
objdump -p target/assets/exalsius-node-agent >"$WORK/objdump.txt"
grep -q 'NEEDED *libc.so.6' "$WORK/objdump.txt" || die "binary is not dynamically linked against glibc"
ok "dynamically linked against glibc (can dlopen libnvidia-ml.so.1)"
depends=$(dpkg-deb -f "$DEB" Depends)
requires=$(rpm -qp --requires "$RPM" 2>/dev/null)
grep -q 'libc6 (>= 2.28)' <<<"$depends" || die "deb Depends lacks libc6 (>= 2.28)"
grep -q 'procps' <<<"$depends" || die "deb Depends lacks procps (/bin/kill)"
grep -q 'glibc >= 2.28' <<<"$requires" || die "rpm Requires lacks glibc >= 2.28"
ok "dependencies: libc6 (>= 2.28), procps / glibc >= 2.28"
dpkg-deb -I "$DEB" conffiles >"$WORK/conffiles"
rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEGROUPNAME}\n]' "$RPM" >"$WORK/rpm.files" 2>/dev/null
grep -qx '/etc/exalsius/node-agent.toml' "$WORK/conffiles" || die "deb conffile"
grep -qx '/etc/exalsius/node-agent.toml cn -rw-r----- exalsius-agent' "$WORK/rpm.files" || die "rpm %config(noreplace) 0640"
ok "config is a conffile / %config(noreplace), 0640 root:exalsius-agent"
dpkg-deb -c "$DEB" >"$WORK/deb.list"
rpm -qlp "$RPM" >"$WORK/rpm.list" 2>/dev/null
for f in /usr/bin/exalsius-node-agent /usr/share/man/man1/exalsius-node-agent.1.gz \
         /usr/share/bash-completion/completions/exalsius-node-agent /usr/share/doc/exalsius-node-agent/README.md; do
  grep -q " \.$f\$" "$WORK/deb.list" || die "deb lacks $f"
  grep -qx "$f" "$WORK/rpm.list" || die "rpm lacks $f"
done
ok "both packages ship binary, man page, completions, README"
rpm -qp --scripts "$RPM" >"$WORK/rpm.scripts" 2>/dev/null
for s in preinstall postinstall preuninstall postuninstall; do
  grep -q "^$s scriptlet" "$WORK/rpm.scripts" || die "rpm lacks %$s"
done
ok "rpm has %pre/%post/%preun/%postun"
systemd-analyze security --offline=true --threshold=20 --no-pager systemd/exalsius-node-agent.service \
  | tee "$WORK/security.txt" | tail -1
grep -q 'Overall exposure level' "$WORK/security.txt" || die "systemd-analyze security"
ok "systemd-analyze security --offline=true --threshold=20 passes"
else
  DEB=$(ls "$PKG"/exalsius-node-agent_*-1_arm64.deb)
  [ -x "$ROOT/lib/systemd/systemd" ] && [ -x "$ROOT/usr/bin/dbus-daemon" ] \
    || die "no bootable arm64 root at $ROOT (packaging/test-arm64.sh makes it)"
fi

say "booted systemd ($ARCH)"
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,ca-certificates,rpm,passwd \
    bookworm "$ROOT.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  mv "$ROOT.tmp" "$ROOT"
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 packaging/standin_api.py "$port" "$API_LOG" "$NODE" "$BOOT" "$REGTOKEN" &
STANDIN_PID=$!
touch "$API_LOG"
machine=agenttest-$$
# A pure cgroup v2 tree for the container, and bpf() allowed in it: systemd applies DevicePolicy=
# and DeviceAllow= as BPF device programs there (in nspawn's default hybrid tree the v1 devices
# controller is read-only, the unit's device policy would silently not apply, and the GPU
# checks below would prove nothing).
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$ROOT" -x --boot --register=no --keep-unit \
  --console=passive -M "$machine" --system-call-filter=bpf --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN \
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
inside() { nsenter -t "$CPID" -a "$@"; }
state=
for _ in $(seq $((120 * TIME_SCALE))); do
  # Early on the container's bus is not up yet: "Failed to connect to bus".
  state=$(timeout 60 nsenter -t "$CPID" -a systemctl is-system-running --wait 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 0.25
done
case "$state" in running | degraded) ;; *) die "container system state: $state" ;; esac
ok "container booted: systemd $state"

# Helpers reading the stand-in's log.
requests() { wc -l <"$API_LOG"; }
wait_requests() { # N TIMEOUT_S
  for _ in $(seq $(($2 * 10 * TIME_SCALE))); do [ "$(requests)" -ge "$1" ] && return 0; sleep 0.1; done
  die "expected $1 requests at the stand-in, got $(requests)"
}
svc() { inside systemctl show -p "$1" --value exalsius-node-agent; }
wait_prop() { # PROP VALUE TIMEOUT_S
  for _ in $(seq $(($3 * 10 * TIME_SCALE))); do [ "$(svc "$1")" = "$2" ] && return 0; sleep 0.1; done
  die "$1 is $(svc "$1"), expected $2"
}
configure() { # INTERVAL
  inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"
node_id = "$NODE"
access_token = "$BOOT"

[heartbeat]
interval = "$1"
jitter = 0.0
initial_backoff = "200ms"
max_backoff = "2s"
EOF
}

if [ "$ARCH" = arm64 ]; then
  # Emulation limits, not the unit's: qemu-user runs threads of its own, so the kernel refuses
  # the emulated systemd's unshare(CLONE_NEWUSER) (EINVAL, "Failed to set up user namespacing")
  # and its IPC-namespace set-up fails (EIO). Only these two, and only under qemu-user; on
  # arm64 hardware the unit runs as shipped (the same file as on x86-64, proven above it).
  inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
  printf '[Service]\nPrivateUsers=no\nPrivateIPC=no\n' \
    | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/qemu-user.conf'
  echo "arm64 under qemu-user: the unit runs with PrivateUsers=no and PrivateIPC=no (qemu-user cannot emulate them)"
fi

say "install the .deb"
inside apt-get install -y -q /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt1.log" 2>&1 || { cat "$WORK/apt1.log"; die "apt-get install"; }
[ "$(inside systemctl is-enabled exalsius-node-agent)" = enabled ] || die "unit not enabled"
ok "apt-get install: unit enabled"
wait_prop ExecMainStatus 78 10
sleep 6 # RestartSec=5s: a restart would have happened by now
[ "$(svc NRestarts)" = 0 ] || die "unconfigured agent restarted $(svc NRestarts) times"
[ "$(svc ActiveState)" = failed ] || die "unconfigured agent: $(svc ActiveState)"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal0.txt"
grep -q 'in /etc/exalsius/node-agent.toml' "$WORK/journal0.txt" || die "no message naming the file to edit"
ok "unconfigured: exit 78, no restart loop, journal names /etc/exalsius/node-agent.toml"
inside systemd-analyze verify --man=no exalsius-node-agent.service >"$WORK/verify.out" 2>"$WORK/verify.err" || true
[ ! -s "$WORK/verify.err" ] || { cat "$WORK/verify.err"; die "systemd-analyze verify"; }
ok "systemd-analyze verify: empty stderr"
[ "$(inside stat -c '%a %U:%G' /etc/exalsius/node-agent.toml)" = "640 root:exalsius-agent" ] || die "config mode"
grep -q ':/var/lib/exalsius-node-agent:/usr/sbin/nologin$' <<<"$(inside getent passwd exalsius-agent)" || die "user"
ok "system user exalsius-agent (nologin, home /var/lib/exalsius-node-agent); config 0640 root:exalsius-agent"

say "register as root, then systemctl enable --now (the README's flow, verbatim but for sudo)"
inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"

[heartbeat]
interval = "1s"
jitter = 0.0
EOF
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent)" = "700 exalsius-agent" ] || die "state dir not the service user's"
inside env EXALSIUS_REGISTER_TOKEN="$REGTOKEN" exalsius-node-agent register \
  --endpoint 192.0.2.7:22 --username ubuntu --ssh-key-id KEY_ID >"$WORK/register.log" 2>&1 \
  || { cat "$WORK/register.log"; die "register as root"; }
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] \
  || die "root's register left $(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)"
ok "register as root: state.json 0600 owned by exalsius-agent in its 0700 directory"
inside systemctl enable --now exalsius-node-agent
beats() { python3 - "$API_LOG" "$REG_NODE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows and rows[0]["method"] == "POST" and rows[0]["status"] == 201, rows[:1]
beats = [r for r in rows if r["node"] == sys.argv[2]]
assert all(r["status"] == 200 for r in beats), beats
print(len(beats))
EOF
}
for _ in $(seq $((100 * TIME_SCALE))); do [ "$(beats 2>/dev/null || echo 0)" -ge 2 ] && break; sleep 0.1; done
[ "$(beats)" -ge 2 ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "registered node did not heartbeat"; }
[ "$(svc ExecMainStatus)" != 78 ] || die "service exited 78"
[ "$(inside stat -c '%U' /var/lib/exalsius-node-agent/state.json)" = exalsius-agent ] || die "state owner"
ok "systemctl enable --now: the service reads the registration and heartbeats rotate its token"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/state.json
: >"$API_LOG"

say "configure and restart"
configure 1s
inside systemctl restart exalsius-node-agent
[ "$(inside systemctl is-active exalsius-node-agent)" = active ] || die "not active after restart"
wait_requests 2 10
python3 - "$API_LOG" <<'EOF' || die "heartbeat body"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert all(r["status"] == 200 for r in rows), rows
b = rows[0]["body"]
assert set(b) >= {"hardware", "software", "system"}, b
assert b["hardware"]["cpu_cores"] >= 1 and b["system"]["kernel"], b
EOF
ok "active after READY; heartbeats arrive with a NodePatchRequest body"
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] || die "state file mode"
[ "$(inside stat -c '%a' /var/lib/exalsius-node-agent)" = 700 ] || die "state dir mode"
ok "state file 0600 exalsius-agent in a 0700 directory"

say "reload"
pid=$(svc MainPID)
inside sed -i 's/^interval = "1s"/interval = "250ms"/' /etc/exalsius/node-agent.toml
before=$(requests)
inside systemctl reload exalsius-node-agent
sleep $((2 * TIME_SCALE))
[ "$(svc MainPID)" = "$pid" ] || die "reload changed the PID"
# The old 1 s interval gives 2 per 2 s, the new 250 ms one 8: at least 5 (per 2 s) tells them apart.
[ $(($(requests) - before)) -ge $((4 * TIME_SCALE + 1)) ] || die "new interval not in use: $(($(requests) - before)) requests in $((2 * TIME_SCALE)) s"
ok "systemctl reload: same PID $pid, new 250 ms interval in use"

say "SIGKILL"
inside kill -KILL "$pid"
for _ in $(seq $((150 * TIME_SCALE))); do
  new=$(svc MainPID); [ "$new" != 0 ] && [ "$new" != "$pid" ] && [ "$(svc ActiveState)" = active ] && break; sleep 0.1
done
[ "$new" != "$pid" ] && [ "$new" != 0 ] || die "not restarted after SIGKILL"
before=$(requests)
wait_requests $((before + 2)) 10
python3 - "$API_LOG" "$BOOT" "$before" <<'EOF' || die "restart did not use the persisted token"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
after = rows[int(sys.argv[3]):]
assert all(r["status"] == 200 for r in rows), [r for r in rows if r["status"] != 200]
assert after[0]["auth"] != "Bearer " + sys.argv[2], "fell back to the bootstrap token"
EOF
ok "SIGKILL: systemd restarted it (PID $pid → $new), it used the persisted token, no 401"

say "watchdog"
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nWatchdogSec=2s\n' | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/watchdog.conf'
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
pid=$(svc MainPID)
inside kill -STOP "$pid"
for _ in $(seq $((150 * TIME_SCALE))); do
  new=$(svc MainPID); [ "$new" != 0 ] && [ "$new" != "$pid" ] && break; sleep 0.1
done
[ "$new" != "$pid" ] || die "watchdog did not fire on a frozen loop"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal1.txt"
grep -q 'Watchdog timeout' "$WORK/journal1.txt" || die "no watchdog timeout in the journal"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/watchdog.conf
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
ok "watchdog: frozen loop (SIGSTOP) killed and restarted by systemd (PID $pid → $new)"

say "journal"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal.txt"
grep -q 'heartbeat ok' "$WORK/journal.txt" || die "no heartbeat lines in the journal"
if grep -q 'SECRET' "$WORK/journal.txt"; then die "a token is in the journal"; fi
ok "journalctl shows the agent's lines ($(wc -l <"$WORK/journal.txt") lines), no token in them"

if amd64_only "GPUs under the unit's device policy"; then
say "GPUs as the packaged service sees them: NVIDIA device nodes (major 195), a stub NVML and nvidia-smi that open them"
# The stub libnvidia-ml (tests/support/fake_nvml.c, open_devices=1) and nvidia-smi
# (tests/support/fake_nvidia_smi.c) open /dev/nvidiactl and /dev/nvidia<i> as the real ones do:
# refused (EPERM) by a device policy; ENXIO (no driver behind the node) counts as an answer.
cc -shared -fPIC -O1 -Wall -Werror -o "$WORK/libnvidia-ml.so.1" tests/support/fake_nvml.c
cc -O1 -Wall -Werror -o "$WORK/nvidia-smi" tests/support/fake_nvidia_smi.c
inside mkdir -p /opt/fake-nvidia
inside sh -c 'cat > /opt/fake-nvidia/libnvidia-ml.so.1' <"$WORK/libnvidia-ml.so.1"
inside sh -c 'cat > /usr/bin/nvidia-smi && chmod 755 /usr/bin/nvidia-smi' <"$WORK/nvidia-smi"
printf 'count=2\nopen_devices=1\n' | inside sh -c 'cat > /opt/fake-nvidia/fake_nvml.conf'
printf '\n[inventory]\ngpu = "auto"\nrefresh_interval = "2s"\nnvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"\n' \
  | inside bash -c 'cat >> /etc/exalsius/node-agent.toml'
nodes() { # create | remove: /dev/nvidiactl, /dev/nvidia0, /dev/nvidia1 as the driver makes them (0666)
  if [ "$1" = create ]; then
    inside sh -c 'mknod -m 666 /dev/nvidiactl c 195 255; mknod -m 666 /dev/nvidia0 c 195 0; mknod -m 666 /dev/nvidia1 c 195 1' 2>/dev/null || true
  else
    inside rm -f /dev/nvidiactl /dev/nvidia0 /dev/nvidia1
  fi
}
devices() { # 550 | 535 | none: the container's /proc/devices, as a driver of that generation lists major 195
  inside sh -c 'while grep -q " /proc/devices " /proc/self/mounts; do umount /proc/devices || break; done'
  local names
  case "$1" in
    550) names='195 nvidia\n195 nvidiactl\n508 nvidia-uvm\n509 nvidia-nvswitch\n510 nvidia-caps' ;;
    535) names='195 nvidia-frontend\n508 nvidia-uvm\n509 nvidia-nvswitch\n510 nvidia-caps' ;;
    none) return 0 ;;
  esac
  # Inside the "Character devices:" block: an empty line ends it for systemd's parser.
  printf "$names\n" | inside sh -c "cat > /run/nvidia-majors.$1"
  inside sh -c "awk -v f=/run/nvidia-majors.$1 '{print} /^Character devices:/{while ((getline l < f) > 0) print l}' /proc/devices >/run/devices.$1 && mount --bind /run/devices.$1 /proc/devices"
  inside grep -q '^195 nvidia' /proc/devices || die "fake /proc/devices ($1) not in place"
}
last_body() { # the newest heartbeat body's GPU fields and software.nvidia: "count|type|nvidia"
  python3 - "$API_LOG" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bodies = [r["body"] for r in rows if r.get("body")]
b = bodies[-1] if bodies else {"hardware": {"gpu_count": -1, "gpu_type": ""}, "software": {"nvidia": ""}}
print(f'{b["hardware"]["gpu_count"]}|{b["hardware"]["gpu_type"]}|{b["software"]["nvidia"]!r}')
EOF
}
gpu_check() { # LABEL EXPECT(2|0|any): restart, wait for 2 heartbeats, compare the newest body
  : >"$API_LOG"
  inside systemctl restart exalsius-node-agent
  wait_requests 2 15
  got=$(last_body)
  case "$2" in
    2) { [ "${got%%|*}" = 2 ] && grep -q '|H100 80GB HBM3|' <<<"$got" && ! grep -q "|''\$" <<<"$got"; } \
         || { inside journalctl -u exalsius-node-agent --no-pager | tail -15; die "$1: expected 2 GPUs and software.nvidia, got $got"; } ;;
    0) { [ "${got%%|*}" = 0 ] && grep -q "|''\$" <<<"$got"; } \
         || { inside journalctl -u exalsius-node-agent --no-pager | tail -15; die "$1: expected no GPUs, got $got"; } ;;
  esac
  echo "$1: gpu_count|gpu_type|software.nvidia = $got"
}
nodes create
devices 550
gpu_check "driver 550+ names (nvidia, nvidiactl), packaged unit" 2
ok "packaged unit, driver 550+ /proc/devices (nvidia, nvidiactl): NVML opens the nodes, the stub's 2 GPUs and software.nvidia are reported"
# bench/gpu-check.sh's run under the unit's sandbox, as it runs on a GPU machine: systemd-run with
# every sandboxing line of the installed unit (bench/gpu_check.py unit_sandbox), a dynamic user.
mapfile -t boxprops < <(python3 -c 'import sys; sys.path.insert(0, "bench"); import gpu_check; print("\n".join(gpu_check.unit_sandbox(sys.argv[1])))' systemd/exalsius-node-agent.service)
inside install -d -m 0755 /run/gpu-check
printf '[inventory]\nnvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"\n' | inside sh -c 'cat > /run/gpu-check/agent.toml && chmod 644 /run/gpu-check/agent.toml'
inside systemd-run --wait --pipe --collect --quiet -p DynamicUser=yes "${boxprops[@]}" \
  /usr/bin/exalsius-node-agent --config /run/gpu-check/agent.toml inventory --json --gpu nvml >"$WORK/boxed.json" 2>"$WORK/boxed.err" \
  || { cat "$WORK/boxed.err"; die "gpu-check's sandboxed run (systemd-run with the unit's properties)"; }
python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["hardware"]; assert h["gpu_count"] == 2, h' "$WORK/boxed.json" \
  || { cat "$WORK/boxed.json" "$WORK/boxed.err"; die "gpu-check's sandboxed run saw no GPUs"; }
ok "bench/gpu-check.sh's sandboxed run (systemd-run, $((${#boxprops[@]} / 2)) properties of the unit, DynamicUser): 2 GPUs through NVML"
devices 535
gpu_check "driver 535 names (nvidia-frontend), packaged unit" 2
ok "packaged unit, driver 535 /proc/devices (nvidia-frontend): the same 2 GPUs"
devices 550
inside sed -i 's|^nvml_library = .*|nvml_library = "/opt/fake-nvidia/absent.so"|' /etc/exalsius/node-agent.toml
gpu_check "no NVML library: nvidia-smi under the sandbox" any
grep -q "550.54.15" <<<"$got" || die "nvidia-smi under the packaged unit's sandbox gave no version: $got"
ok "packaged unit: nvidia-smi runs under the sandbox (SystemCallFilter, MemoryDenyWriteExecute, PrivateUsers) and opens the nodes: software.nvidia set"
inside sed -i 's|^nvml_library = .*|nvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"|' /etc/exalsius/node-agent.toml
# The unit as it was before this change (DeviceAllow=char-nvidia-frontend): it fails on 550+.
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nDeviceAllow=\nDeviceAllow=char-nvidia-frontend rw\nDeviceAllow=char-nvidia-uvm rw\nDeviceAllow=char-nvidia-caps r\nDeviceAllow=char-kfd rw\nDeviceAllow=char-drm rw\n' \
  | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/old-devices.conf'
inside systemctl daemon-reload
gpu_check "the previous unit (char-nvidia-frontend), driver 550+" 0
inside journalctl -u exalsius-node-agent --no-pager -n 60 >"$WORK/journal-old-unit.txt"
grep -q "device policy refuses it" "$WORK/journal-old-unit.txt" || { tail -20 "$WORK/journal-old-unit.txt"; die "no device-policy advice under the old unit"; }
ok "the previous unit fails the same check: no GPUs, no software.nvidia, and the warning names the device policy (not nvidia-persistenced)"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/old-devices.conf
inside systemctl daemon-reload
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart

say "a driver loaded after the service started: the agent has systemd start it again, once"
nodes remove
devices none
: >"$API_LOG"
inside systemctl start exalsius-node-agent
wait_requests 1 15
restarts=$(svc NRestarts)
[ "$(last_body | cut -d'|' -f1)" = 0 ] || die "GPUs before the driver was loaded?"
loaded=$(date +%s)
nodes create
devices 550
found=
for _ in $(seq $((300 * TIME_SCALE))); do
  [ "$(last_body | cut -d'|' -f1)" = 2 ] && { found=$(date +%s); break; }
  sleep 0.1
done
[ -n "$found" ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "GPUs not reported within 30 s of the driver appearing"; }
[ "$(svc NRestarts)" = $((restarts + 1)) ] || die "expected one restart, NRestarts $restarts → $(svc NRestarts)"
inside journalctl -u exalsius-node-agent --no-pager -n 80 >"$WORK/journal-late.txt"
grep -q "stopping so that systemd starts the service again" "$WORK/journal-late.txt" || die "no line saying why it restarted"
ok "driver loaded after start: GPUs reported $((found - loaded)) s after the nodes appeared (refresh 2 s + RestartSec 5 s), through exactly one restart by systemd"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart /usr/bin/nvidia-smi
nodes remove
devices none
inside sed -i '/^\[inventory\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl start exalsius-node-agent
fi

if amd64_only "metrics textfile"; then
say "metrics textfile under the hardened unit (README \"Monitoring\")"
inside install -d -m 0755 /var/lib/prometheus/node-exporter
inside chown exalsius-agent /var/lib/prometheus/node-exporter
printf '\n[metrics]\ntextfile = "/var/lib/prometheus/node-exporter/exalsius_node_agent.prom"\n' \
  | inside bash -c 'cat >> /etc/exalsius/node-agent.toml'
inside systemctl restart exalsius-node-agent
before=$(requests)
wait_requests $((before + 3)) 10
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal-metrics.txt"
grep -q 'metrics: cannot write .*Read-only file system' "$WORK/journal-metrics.txt" \
  || { tail -20 "$WORK/journal-metrics.txt"; die "no warning about the read-only textfile directory"; }
[ "$(grep -c 'metrics: cannot write' "$WORK/journal-metrics.txt")" = 1 ] || die "the metrics warning repeats"
inside test ! -e /var/lib/prometheus/node-exporter/exalsius_node_agent.prom || die "wrote through ProtectSystem=strict?"
ok "without the drop-in: ProtectSystem=strict keeps the directory read-only, one warning, heartbeats go on"
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nReadWritePaths=-/var/lib/prometheus/node-exporter\n' \
  | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/metrics.conf'
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
# The container runs on an ephemeral snapshot (-x): read the file from inside.
prom=$WORK/exalsius_node_agent.prom
for _ in $(seq 100); do
  inside cat /var/lib/prometheus/node-exporter/exalsius_node_agent.prom >"$prom" 2>/dev/null && [ -s "$prom" ] && break
  sleep 0.1
done
[ -s "$prom" ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "no metrics file with the drop-in"; }
[ "$(inside stat -c '%a %U' /var/lib/prometheus/node-exporter/exalsius_node_agent.prom)" = "644 exalsius-agent" ] || die "metrics file mode"
/usr/bin/python3 - "$prom" <<'EOF' || die "metrics file does not parse"
import sys
from prometheus_client.parser import text_string_to_metric_families
samples = {s.name: s.value for f in text_string_to_metric_families(open(sys.argv[1]).read()) for s in f.samples}
assert samples["exalsius_node_agent_last_http_status"] == 200, samples
assert samples["exalsius_node_agent_last_success_timestamp_seconds"] > 0, samples
EOF
if [ -n "${EXALSIUS_PROMTOOL:-}" ]; then
  "$EXALSIUS_PROMTOOL" check metrics <"$prom" || die "promtool check metrics"
fi
ok "with the README's drop-in (ReadWritePaths=): the service writes the textfile, 0644, parsed by prometheus_client"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/metrics.conf
inside sed -i '/^\[metrics\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
fi

if amd64_only "upgrade"; then
say "upgrade"
pid=$(svc MainPID)
token_before=$(inside python3 -c 'import json; print(json.load(open("/var/lib/exalsius-node-agent/state.json"))["access_token"])' 2>/dev/null \
  || inside sed -n 's/.*"access_token": "\(.*\)".*/\1/p' /var/lib/exalsius-node-agent/state.json)
inside apt-get install -y -q /mnt/pkg/upgrade/"$(basename "$DEB2")" >"$WORK/apt2.log" 2>&1 || { cat "$WORK/apt2.log"; die "upgrade"; }
[ "$(inside dpkg-query -W -f '${Version}' exalsius-node-agent)" = "$(basename "$DEB2" | sed 's/.*_\(.*\)_amd64.deb/\1/')" ] || die "version"
inside grep -q "127.0.0.1:$port" /etc/exalsius/node-agent.toml || die "upgrade replaced the edited config"
for _ in $(seq 100); do new=$(svc MainPID); [ "$new" != "$pid" ] && [ "$new" != 0 ] && break; sleep 0.1; done
[ "$new" != "$pid" ] || die "not restarted on upgrade"
[ -n "$token_before" ] || die "no token in the state before the upgrade"
before=$(requests)
wait_requests $((before + 2)) 10
python3 - "$API_LOG" <<'EOF' || die "401 after upgrade"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert all(r["status"] == 200 for r in rows)
EOF
ok "upgrade to -2: config kept, state kept (no 401), service restarted (PID $pid → $new)"
fi

say "purge"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt3.log" 2>&1 || { cat "$WORK/apt3.log"; die "purge"; }
inside test ! -e /var/lib/exalsius-node-agent || die "state dir survived purge"
inside test ! -e /etc/exalsius/node-agent.toml || die "config survived purge"
inside test ! -e /lib/systemd/system/exalsius-node-agent.service || die "unit survived purge"
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "still running after purge"
ok "apt-get purge: state, config and unit gone, service stopped"

if amd64_only "client-hw-info takeover and the .rpm"; then
say "take over from client-hw-info on install (import-legacy in the postinst)"
# The old tool as it left machines: a root timer every 15 minutes, its one-shot service, and
# root's config.env with the latest rotated token (the stand-in accepts only that one). The
# fake binary records each run that found credentials.
inside bash -c 'cat > /usr/local/bin/client-hw-info' <<'EOF'
#!/bin/sh
[ -f /root/.config/exalsius/config.env ] || { echo "client-hw-info: no credentials" >&2; exit 1; }
date +%s >>/var/log/client-hw-info.runs
EOF
inside chmod 755 /usr/local/bin/client-hw-info
inside bash -c 'cat > /etc/systemd/system/client-hw-info.service' <<'EOF'
[Unit]
Description=client-hw-info (legacy)
[Service]
Type=oneshot
ExecStart=/usr/local/bin/client-hw-info
EOF
inside bash -c 'cat > /etc/systemd/system/client-hw-info.timer' <<'EOF'
[Unit]
Description=client-hw-info every 15 minutes (legacy)
[Timer]
OnBootSec=1min
OnUnitActiveSec=15min
[Install]
WantedBy=timers.target
EOF
inside mkdir -p /root/.config/exalsius
inside bash -c 'cat > /root/.config/exalsius/config.env' <<EOF
# written by client-hw-info
NODE_ID="$LEGACY_NODE"
API_URL="http://127.0.0.1:$port/v1"
AUTH_TOKEN="$LEGACY_TOKEN"
EOF
inside systemctl daemon-reload
inside systemctl enable --now client-hw-info.timer >/dev/null 2>&1
inside systemctl start client-hw-info.service
inside test -s /var/log/client-hw-info.runs || die "the fake legacy tool did not run"
[ "$(inside systemctl is-active client-hw-info.timer)" = active ] || die "legacy timer not active"
# The operator's config management put the agent's config in place first (api.url only).
operator_config() {
  inside mkdir -p /etc/exalsius
  inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"

[heartbeat]
interval = "1s"
jitter = 0.0
EOF
}
operator_config
# First with `systemctl disable` failing after `stop` worked (a read-only timers.target.wants):
# the import must start the legacy timer again, change nothing, and the postinst say so.
inside mount --bind /etc/systemd/system/timers.target.wants /etc/systemd/system/timers.target.wants
inside mount -o remount,ro,bind /etc/systemd/system/timers.target.wants
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy-fail.log" 2>&1 \
  || { cat "$WORK/apt-legacy-fail.log"; die "apt-get install with a failing disable"; }
inside umount /etc/systemd/system/timers.target.wants
grep -q "is enabled and running again" "$WORK/apt-legacy-fail.log" || { cat "$WORK/apt-legacy-fail.log"; die "import-legacy did not say it restarted the legacy timer"; }
grep -q "client-hw-info keeps running (its timer is active)" "$WORK/apt-legacy-fail.log" || { cat "$WORK/apt-legacy-fail.log"; die "the postinst did not say client-hw-info keeps running"; }
[ "$(inside systemctl is-active client-hw-info.timer || true)" = active ] || die "legacy timer left stopped after a failed import"
inside test -f /root/.config/exalsius/config.env || die "config.env renamed although nothing was imported"
inside test ! -e /var/lib/exalsius-node-agent/state.json || die "state written although the import failed"
inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge after the failed import"
operator_config
ok "a failed disable after a working stop: the legacy timer runs again, nothing imported, and the postinst says so"
: >"$API_LOG"
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy.log" 2>&1 \
  || { cat "$WORK/apt-legacy.log"; die "apt-get install over client-hw-info"; }
grep -q 'taking over its node' "$WORK/apt-legacy.log" || { cat "$WORK/apt-legacy.log"; die "the postinst did not run import-legacy"; }
grep -q "imported node $LEGACY_NODE" "$WORK/apt-legacy.log" || { cat "$WORK/apt-legacy.log"; die "import-legacy did not import"; }
if grep -q SECRET "$WORK/apt-legacy.log"; then die "the install printed a token"; fi
ok "apt-get install: the postinst imported client-hw-info's node $LEGACY_NODE (no token printed)"
[ "$(inside systemctl is-enabled client-hw-info.timer || true)" = disabled ] || die "legacy timer still enabled"
[ "$(inside systemctl is-active client-hw-info.timer || true)" = inactive ] || die "legacy timer still active"
inside test ! -e /root/.config/exalsius/config.env || die "config.env not renamed"
inside test -f /root/.config/exalsius/config.env.migrated || die "no config.env.migrated"
runs=$(inside sh -c 'wc -l </var/log/client-hw-info.runs')
inside systemctl start client-hw-info.service 2>/dev/null && die "the legacy tool still runs with credentials"
[ "$(inside sh -c 'wc -l </var/log/client-hw-info.runs')" = "$runs" ] || die "the legacy tool ran again with credentials"
ok "client-hw-info.timer stopped and disabled, config.env renamed: the legacy tool finds no credentials"
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] || die "imported state owner/mode"
for _ in $(seq 100); do [ "$(requests)" -ge 2 ] && break; sleep 0.1; done
python3 - "$API_LOG" "$LEGACY_NODE" "$LEGACY_TOKEN" <<'EOF' || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "first heartbeats after the takeover"; }
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
beats = [r for r in rows if r["node"] == sys.argv[2]]
assert len(beats) >= 2, rows
assert beats[0]["auth"] == "Bearer " + sys.argv[3] and beats[0]["status"] == 200, beats[0]
assert beats[1]["auth"] != beats[0]["auth"] and beats[1]["status"] == 200, beats[1]
assert all(r["status"] == 200 for r in rows), rows
EOF
ok "the service started with the imported node: the first heartbeat carried the legacy token, the next a rotated one"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt4.log" 2>&1 || { cat "$WORK/apt4.log"; die "purge"; }
inside rm -rf /etc/systemd/system/client-hw-info.service /etc/systemd/system/client-hw-info.timer /root/.config/exalsius
inside systemctl daemon-reload

say "the .rpm in the same booted container"
inside userdel exalsius-agent 2>/dev/null || true
inside rpm -i --nodeps /mnt/pkg/"$(basename "$RPM")" >"$WORK/rpm.log" 2>&1 || { cat "$WORK/rpm.log"; die "rpm -i"; }
inside getent passwd exalsius-agent >/dev/null || die "%pre did not create the user"
[ "$(inside stat -c '%a %U:%G' /etc/exalsius/node-agent.toml)" = "640 root:exalsius-agent" ] || die "rpm config mode"
[ "$(inside systemctl is-enabled exalsius-node-agent)" = enabled ] || die "%post did not enable the unit"
wait_prop ExecMainStatus 78 10
ok "rpm -i: %pre created the user, %post enabled and started the unit (unconfigured → 78)"
configure 1s
before=$(requests)
inside systemctl restart exalsius-node-agent
wait_requests $((before + 2)) 10
ok "rpm-installed agent heartbeats after configuration"
inside rpm -e exalsius-node-agent >"$WORK/rpm-e.log" 2>&1 || { cat "$WORK/rpm-e.log"; die "rpm -e"; }
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "%preun did not stop it"
inside test -f /var/lib/exalsius-node-agent/state.json || die "rpm -e removed the state"
ok "rpm -e: %preun stopped and disabled; the state (token) is kept, as Debian's remove keeps it"
fi

say "done: $checks checks passed ($ARCH)"
