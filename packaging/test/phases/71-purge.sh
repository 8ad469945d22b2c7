# about: apt-get purge: state, config and unit gone, the service stopped
# needs: installed
say "purge"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt3.log" 2>&1 || { show "$WORK/apt3.log"; die "purge"; }
inside test ! -e /var/lib/exalsius-node-agent || die "state dir survived purge"
inside test ! -e /etc/exalsius/node-agent.toml || die "config survived purge"
inside test ! -e /lib/systemd/system/exalsius-node-agent.service || die "unit survived purge"
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "still running after purge"
ok "apt-get purge: state, config and unit gone, service stopped"
