# about: NVIDIA's real libnvidia-ml 550 and nvidia-smi under the installed unit's sandbox: past today's device cgroup to the driver check (DRIVER_NOT_LOADED), refused under the previous unit's device lines (NO_PERMISSION), never killed by SystemCallFilter= or MemoryDenyWriteExecute=
# needs: configured
# arm64: skip the real NVIDIA library under the unit (x86-64 libraries; the unit is proven by the x86-64 run)
say "NVIDIA's real userspace (libnvidia-ml 550, nvidia-smi 550) under the installed unit's sandbox"
# The service is stopped meanwhile: the device nodes the proof makes would look like a driver
# loaded after start to the running agent (phase late-driver), which restarts itself once.
inside systemctl stop exalsius-node-agent
packaging/proof-real-nvml.sh "$CPID" || die "the real libnvidia-ml under the unit (packaging/proof-real-nvml.sh)"
inside sh -c 'umount /proc/devices 2>/dev/null; rm -f /dev/nvidiactl /dev/nvidia0; rm -rf /opt/real-nvidia /run/real-nvml; rm -f /var/lib/exalsius-node-agent/device-policy-restart'
inside systemctl start exalsius-node-agent
