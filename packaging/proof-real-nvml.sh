#!/usr/bin/env bash
# The packaged unit with NVIDIA's real userspace (issue 30 item 2): the real libnvidia-ml 550 and
# nvidia-smi 550 (packaging/fetch-nvidia.sh's cache) run under the installed unit's sandbox in a
# booted container, with NVIDIA-like device nodes (major 195, no driver behind them) and a
# /proc/devices as a 550 driver lists it:
#   - today's unit (DeviceAllow=char-nvidia*): past the device cgroup to the driver check —
#     NVML says DRIVER_NOT_LOADED (ENXIO), nvidia-smi exits 9;
#   - the previous unit's device lines (char-nvidia-frontend): the device cgroup refuses (EPERM)
#     — the real library says UNKNOWN (999), not NO_PERMISSION, and nvidia-smi exits 255; the
#     agent opens the node itself, gets EPERM and names the device policy;
#   - neither is killed by SystemCallFilter= (SIGSYS) or refused by MemoryDenyWriteExecute=.
#
#   packaging/proof-real-nvml.sh CPID
#
# CPID: the booted container's PID 1 (systemd), with the package installed (what
# packaging/test-packages.sh boots). Needs EXALSIUS_NVIDIA_CACHE (or the default cache) and the
# repository as the working directory. Exit 0: proven; 1: a check failed (says which).
set -euo pipefail
cd "$(dirname "$0")/.."
CPID=${1:?usage: $0 CPID}
cache=${EXALSIUS_NVIDIA_CACHE:-/var/cache/exalsius-ci/nvidia}
die() { printf 'FAIL real NVML: %s\n' "$*" >&2; exit 1; }
ok() { printf 'ok   real NVML: %s\n' "$*"; }
inside() { nsenter -t "$CPID" -a "$@"; }

lib=$(find "$cache/550" -name libnvidia-ml.so.1 | head -1)
smi=$(find "$cache/550" -path '*/nvidia/current/nvidia-smi' -type f | head -1)
[ -n "$lib" ] && [ -n "$smi" ] || die "no libnvidia-ml/nvidia-smi 550 under $cache (packaging/fetch-nvidia.sh)"

# The real files in the container, readable by a dynamic user.
inside mkdir -p /opt/real-nvidia /run/real-nvml
inside sh -c 'cat > /opt/real-nvidia/libnvidia-ml.so.1' <"$(realpath "$lib")"
inside sh -c 'cat > /opt/real-nvidia/nvidia-smi && chmod 755 /opt/real-nvidia/nvidia-smi' <"$smi"
inside chmod -R a+rX /opt/real-nvidia
printf '[inventory]\nnvml_library = "/opt/real-nvidia/libnvidia-ml.so.1"\n' \
  | inside sh -c 'cat > /run/real-nvml/agent.toml && chmod 644 /run/real-nvml/agent.toml'

# The nodes as the driver makes them (0666), and major 195 named as a 550 driver names it.
inside sh -c 'for n in "nvidiactl 255" "nvidia0 0"; do set -- $n; [ -e /dev/$1 ] || mknod -m 666 /dev/$1 c 195 $2; done'
if ! inside grep -q '^195 nvidia$' /proc/devices; then
  printf '195 nvidia\n195 nvidiactl\n' | inside sh -c 'cat > /run/real-nvml/majors'
  inside sh -c "awk '{print} /^Character devices:/{while ((getline l < \"/run/real-nvml/majors\") > 0) print l}' /proc/devices >/run/real-nvml/devices && mount --bind /run/real-nvml/devices /proc/devices"
fi

# The installed unit's sandboxing lines, as systemd-run properties (bench/gpu_check.py).
unit=$(inside sh -c 'ls /lib/systemd/system/exalsius-node-agent.service /usr/lib/systemd/system/exalsius-node-agent.service 2>/dev/null | head -1')
[ -n "$unit" ] || die "the package's unit is not installed in the container"
inside cat "$unit" >/tmp/proof-real-nvml.unit.$$
mapfile -t props < <(python3 -c 'import sys; sys.path.insert(0, "bench"); import gpu_check; print("\n".join(gpu_check.unit_sandbox(sys.argv[1])))' /tmp/proof-real-nvml.unit.$$)
rm -f /tmp/proof-real-nvml.unit.$$
old=(-p "DeviceAllow=" -p "DeviceAllow=char-nvidia-frontend rw" -p "DeviceAllow=char-nvidia-uvm rw"
     -p "DeviceAllow=char-nvidia-caps r" -p "DeviceAllow=char-kfd rw" -p "DeviceAllow=char-drm rw")

boxed() { # LABEL EXTRA-PROPS...: inventory and nvidia-smi under the unit's sandbox; sets notes, smi_rc
  local label=$1
  shift
  local out
  out=$(inside systemd-run --wait --pipe --collect --quiet -p DynamicUser=yes "${props[@]}" "$@" \
    /usr/bin/exalsius-node-agent --config /run/real-nvml/agent.toml inventory --verbose-json --gpu nvml 2>&1) \
    || die "$label: inventory exited non-zero: ${out: -400}"
  notes=$(python3 -c 'import json,sys; t=sys.stdin.read(); d=json.loads(t[t.index("{"):])["details"]; print("\n".join(d.get("gpu_notes", [])))' <<<"$out") \
    || die "$label: no JSON from inventory: ${out: -400}"
  grep -q 'SIGSYS\|signal 31' <<<"$notes$out" && die "$label: the probe was killed by SystemCallFilter=: $notes"
  smi_rc=0
  inside systemd-run --wait --pipe --collect --quiet -p DynamicUser=yes "${props[@]}" "$@" \
    -E LD_LIBRARY_PATH=/opt/real-nvidia /opt/real-nvidia/nvidia-smi >/dev/null 2>&1 || smi_rc=$?
  echo "$label: notes: $notes; nvidia-smi exit $smi_rc"
}

boxed "today's unit"
grep -q "NVIDIA driver is not loaded" <<<"$notes" || die "today's unit: want DRIVER_NOT_LOADED past the device cgroup, got: $notes"
grep -qi "permission" <<<"$notes" && die "today's unit: the device cgroup refused the real library: $notes"
[ "$smi_rc" = 9 ] || die "today's unit: nvidia-smi exit $smi_rc, want 9 (driver not loaded)"
ok "today's unit: the real 550 library and nvidia-smi get past the device cgroup to the driver check (DRIVER_NOT_LOADED, exit 9)"

boxed "the previous unit's device lines" "${old[@]}"
grep -q "device policy refuses it" <<<"$notes" || die "previous unit: want the device-policy advice, got: $notes"
[ "$smi_rc" = 255 ] || die "previous unit: nvidia-smi exit $smi_rc, want 255 (device control blocked)"
ok "the previous unit's device lines: the real library is refused (UNKNOWN; the agent's own open gets EPERM and names the device policy), nvidia-smi exits 255"

inside sh -c 'journalctl --no-pager -n 400 | grep -Ei "audit.*(seccomp|SECCOMP)|mprotect.*(EPERM|denied)"' \
  && die "the journal shows a seccomp kill or a refused mprotect"
ok "no SIGSYS, no refused mprotect (SystemCallFilter=, MemoryDenyWriteExecute=)"
