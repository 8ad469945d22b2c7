# about: a driver loaded after the service started: the agent has systemd start it again, once; then the GPU stub is removed
# needs: configured gpu_stub
# arm64: skip GPUs under the unit's device policy (architecture-independent, proven by the x86-64 run)
say "a driver loaded after the service started: the agent has systemd start it again, once"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart
nodes remove
devices none
: >"$API_LOG"
inside systemctl start exalsius-node-agent
wait_requests 1 15
restarts=$(svc NRestarts)
[ "$(last_gpus | cut -d'|' -f1)" = 0 ] || die "GPUs before the driver was loaded?"
loaded=$(date +%s)
nodes create
devices 550
two_gpus() { [ "$(last_gpus | cut -d'|' -f1)" = 2 ]; }
until_true 300 two_gpus || { journal_tail; die "GPUs not reported within 30 s of the driver appearing"; }
found=$(date +%s)
[ "$(svc NRestarts)" = $((restarts + 1)) ] || die "expected one restart, NRestarts $restarts → $(svc NRestarts)"
journal -n 80 >"$WORK/journal-late.txt"
grep -q "stopping so that systemd starts the service again" "$WORK/journal-late.txt" || die "no line saying why it restarted"
ok "driver loaded after start: GPUs reported $((found - loaded)) s after the nodes appeared (refresh 2 s + RestartSec 5 s), through exactly one restart by systemd"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart /usr/bin/nvidia-smi
nodes remove
devices none
inside sed -i '/^\[inventory\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl start exalsius-node-agent
