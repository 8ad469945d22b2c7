# about: apt-get install the .deb: unit enabled, unconfigured exit 78 without a restart loop, systemd-analyze verify, the system user and the config's mode
# needs: packages container
say "install the .deb"
inside apt-get install -y -q /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt1.log" 2>&1 || { show "$WORK/apt1.log"; die "apt-get install"; }
[ "$(inside systemctl is-enabled exalsius-node-agent)" = enabled ] || die "unit not enabled"
ok "apt-get install: unit enabled"
wait_prop ExecMainStatus 78 10
sleep 6 # RestartSec=5s: a restart would have happened by now
[ "$(svc NRestarts)" = 0 ] || die "unconfigured agent restarted $(svc NRestarts) times"
[ "$(svc ActiveState)" = failed ] || die "unconfigured agent: $(svc ActiveState)"
journal >"$WORK/journal0.txt"
grep -q 'in /etc/exalsius/node-agent.toml' "$WORK/journal0.txt" || die "no message naming the file to edit"
ok "unconfigured: exit 78, no restart loop, journal names /etc/exalsius/node-agent.toml"
inside systemd-analyze verify --man=no exalsius-node-agent.service >"$WORK/verify.out" 2>"$WORK/verify.err" || true
[ ! -s "$WORK/verify.err" ] || { show "$WORK/verify.err"; die "systemd-analyze verify"; }
ok "systemd-analyze verify: empty stderr"
[ "$(inside stat -c '%a %U:%G' /etc/exalsius/node-agent.toml)" = "640 root:exalsius-agent" ] || die "config mode"
grep -q ':/var/lib/exalsius-node-agent:/usr/sbin/nologin$' <<<"$(inside getent passwd exalsius-agent)" || die "user"
ok "system user exalsius-agent (nologin, home /var/lib/exalsius-node-agent); config 0640 root:exalsius-agent"
