# about: upgrade to the -2 revision of the .deb: config and state kept (no 401), the service restarted
# needs: configured
# arm64: skip upgrade (architecture-independent, proven by the x86-64 run)
say "upgrade"
pid=$(svc MainPID)
token_before=$(inside python3 -c 'import json; print(json.load(open("/var/lib/exalsius-node-agent/state.json"))["access_token"])' 2>/dev/null \
  || inside sed -n 's/.*"access_token": "\(.*\)".*/\1/p' /var/lib/exalsius-node-agent/state.json)
inside apt-get install -y -q /mnt/pkg/upgrade/"$(basename "$DEB2")" >"$WORK/apt2.log" 2>&1 || { show "$WORK/apt2.log"; die "upgrade"; }
[ "$(inside dpkg-query -W -f '${Version}' exalsius-node-agent)" = "$(basename "$DEB2" | sed 's/.*_\(.*\)_amd64.deb/\1/')" ] || die "version"
inside grep -q "127.0.0.1:$port" /etc/exalsius/node-agent.toml || die "upgrade replaced the edited config"
TIME_SCALE=1 wait_new_pid "$pid" 100 || die "not restarted on upgrade"
[ -n "$token_before" ] || die "no token in the state before the upgrade"
before=$(requests)
wait_requests $((before + 2)) 10
apilog all-ok || die "401 after upgrade"
ok "upgrade to -2: config kept, state kept (no 401), service restarted (PID $pid → $new)"
