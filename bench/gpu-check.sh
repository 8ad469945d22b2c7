#!/usr/bin/env bash
# The GPU proof (issue 15): the agent's GPUs through NVML and through the PCI scan, side by side
# with nvidia-smi; each health check's raw NVML answer per GPU (issue 32: which checks this
# driver offers); NVML init and refresh times; peak RSS with NVML loaded vs gpu = "off"; a
# SIGTERM during a refresh. Exits 1 on any disagreement.
#
#   bash bench/gpu-check.sh [--bin PATH] [--seconds N] [--out FILE]   on a machine with an NVIDIA GPU
#   bash bench/gpu-check.sh --stub [--seconds N]                       here: stub NVML, fixture PCI tree
#
# On a GPU machine, carry a release binary built here (it needs only glibc ≥ 2.28 and the
# driver's libnvidia-ml.so.1) and commit the report: --out bench/results/gpu-<model>.md.
# Needs python3 (standard library only). GPU_CHECK_ROOT=tests/fixtures/hosts/a100x8 makes the
# stub run compare against another host's PCI tree (to see the check fail).
set -euo pipefail
cd "$(dirname "$0")/.."

bin=
stub=false
seconds=60
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --stub) stub=true; shift ;;
    --seconds) seconds=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    *) echo "usage: $0 [--stub] [--bin PATH] [--seconds N] [--out FILE]" >&2; exit 2 ;;
  esac
done
if [ -z "$bin" ]; then
  for b in target/release/exalsius-node-agent target/assets/exalsius-node-agent ./exalsius-node-agent; do
    [ -x "$b" ] && { bin=$b; break; }
  done
fi
[ -n "$bin" ] && [ -x "$bin" ] || { echo "no binary: cargo build --release, or --bin PATH" >&2; exit 2; }
command -v python3 >/dev/null || { echo "gpu-check needs python3" >&2; exit 2; }
bin=$(realpath "$bin")

extra=()
if $stub; then
  # The stub NVML as eight H100 SXM5 (what a real HGX H100 reports), a fake nvidia-smi that
  # prints what the stub holds, and the h100x8 fixture host for the PCI scan.
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cc -shared -fPIC -O1 -Wall -Werror -o "$work/libnvidia-ml.so.1" tests/support/fake_nvml.c
  printf 'count=8\nname=NVIDIA H100 80GB HBM3\nmem_mib=81559\ndriver=550.54.15\n' >"$work/fake_nvml.conf"
  mkdir -p "$work/bin"
  cat >"$work/bin/nvidia-smi" <<'EOF'
#!/bin/sh
# Fake nvidia-smi for gpu-check --stub: the stub NVML's eight GPUs (same buses and UUIDs).
if [ "$1" = "--version" ]; then
  echo "NVIDIA-SMI version  : 550.54.15 (stub)"; echo "DRIVER version      : 550.54.15"; exit 0
fi
i=0
for bus in 18 2A 3A 5D 9A AB BA DB; do
  printf 'NVIDIA H100 80GB HBM3, 81559, GPU-f00dfeed-0000-4000-8000-%012d, 00000000:%s:00.0, 550.54.15\n' "$i" "$bus"
  i=$((i + 1))
done
EOF
  chmod 755 "$work/bin/nvidia-smi"
  export PATH="$work/bin:$PATH"
  extra=(--lib "$work/libnvidia-ml.so.1" --root "${GPU_CHECK_ROOT:-tests/fixtures/hosts/h100x8}" --stub --block-conf "$work/fake_nvml.conf")
fi
exec python3 bench/gpu_check.py --bin "$bin" --seconds "$seconds" ${out:+--out "$out"} "${extra[@]}"
