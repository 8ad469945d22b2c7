# about: register as root, then systemctl enable --now (the operator's guide's flow): state.json owned by the service user, heartbeats rotate its token
# needs: installed
say "register as root, then systemctl enable --now (the README's flow, verbatim but for sudo)"
operator_config
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent)" = "700 exalsius-agent" ] || die "state dir not the service user's"
inside env EXALSIUS_REGISTER_TOKEN="$REGTOKEN" exalsius-node-agent register \
  --endpoint 192.0.2.7:22 --username ubuntu --ssh-key-id KEY_ID >"$WORK/register.log" 2>&1 \
  || { show "$WORK/register.log"; die "register as root"; }
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] \
  || die "root's register left $(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)"
ok "register as root: state.json 0600 owned by exalsius-agent in its 0700 directory"
inside systemctl enable --now exalsius-node-agent
two_beats() { [ "$(apilog registered "$REG_NODE" 2>/dev/null || echo 0)" -ge 2 ]; }
until_true 100 two_beats || true
[ "$(apilog registered "$REG_NODE")" -ge 2 ] || { journal_tail; die "registered node did not heartbeat"; }
[ "$(svc ExecMainStatus)" != 78 ] || die "service exited 78"
[ "$(inside stat -c '%U' /var/lib/exalsius-node-agent/state.json)" = exalsius-agent ] || die "state owner"
ok "systemctl enable --now: the service reads the registration and heartbeats rotate its token"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/state.json
: >"$API_LOG"
