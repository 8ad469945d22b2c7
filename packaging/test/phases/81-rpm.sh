# about: the .rpm in the same booted container (rpm -i --nodeps): %pre, %post, heartbeats once configured, rpm -e keeps the state
# needs: packages absent
# arm64: skip the .rpm (architecture-independent, proven by the x86-64 run)
say "the .rpm in the same booted container"
inside userdel exalsius-agent 2>/dev/null || true
inside rpm -i --nodeps /mnt/pkg/"$(basename "$RPM")" >"$WORK/rpm.log" 2>&1 || { show "$WORK/rpm.log"; die "rpm -i"; }
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
inside rpm -e exalsius-node-agent >"$WORK/rpm-e.log" 2>&1 || { show "$WORK/rpm-e.log"; die "rpm -e"; }
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "%preun did not stop it"
inside test -f /var/lib/exalsius-node-agent/state.json || die "rpm -e removed the state"
ok "rpm -e: %preun stopped and disabled; the state (token) is kept, as Debian's remove keeps it"
