# about: GPUs as the packaged service sees them: NVIDIA device nodes (major 195) under the unit's device policy, driver 550+ and 535 names, bench/gpu-check.sh's sandboxed run, nvidia-smi, the previous unit's failure
# needs: configured gpu_stub
# arm64: skip GPUs under the unit's device policy (architecture-independent, proven by the x86-64 run)
say "GPUs as the packaged service sees them: NVIDIA device nodes (major 195), a stub NVML and nvidia-smi that open them"
gpu_check() { # LABEL EXPECT(2|0|any): restart, wait for 2 heartbeats, compare the newest body
  : >"$API_LOG"
  inside systemctl restart exalsius-node-agent
  wait_requests 2 15
  got=$(last_gpus)
  case "$2" in
    2) { [ "${got%%|*}" = 2 ] && grep -q '|H100 80GB HBM3|' <<<"$got" && ! grep -q "|''\$" <<<"$got"; } \
         || { journal_tail 15; die "$1: expected 2 GPUs and software.nvidia, got $got"; } ;;
    0) { [ "${got%%|*}" = 0 ] && grep -q "|''\$" <<<"$got"; } \
         || { journal_tail 15; die "$1: expected no GPUs, got $got"; } ;;
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
put /run/gpu-check/agent.toml 644 <"$FILES/gpu-check.toml"
inside systemd-run --wait --pipe --collect --quiet -p DynamicUser=yes "${boxprops[@]}" \
  /usr/bin/exalsius-node-agent --config /run/gpu-check/agent.toml inventory --json --gpu nvml >"$WORK/boxed.json" 2>"$WORK/boxed.err" \
  || { show "$WORK/boxed.err"; die "gpu-check's sandboxed run (systemd-run with the unit's properties)"; }
python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["hardware"]; assert h["gpu_count"] == 2, h' "$WORK/boxed.json" \
  || { show "$WORK/boxed.json" "$WORK/boxed.err"; die "gpu-check's sandboxed run saw no GPUs"; }
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
# The unit as it was before DeviceAllow= named the 550+ majors (char-nvidia-frontend): it fails on 550+.
drop_in old-devices.conf
inside systemctl daemon-reload
gpu_check "the previous unit (char-nvidia-frontend), driver 550+" 0
journal -n 60 >"$WORK/journal-old-unit.txt"
grep -q "device policy refuses it" "$WORK/journal-old-unit.txt" || { tail -20 "$WORK/journal-old-unit.txt" >&2; die "no device-policy advice under the old unit"; }
ok "the previous unit fails the same check: no GPUs, no software.nvidia, and the warning names the device policy (not nvidia-persistenced)"
inside rm -f "$UNIT_D/old-devices.conf"
inside systemctl daemon-reload
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart
