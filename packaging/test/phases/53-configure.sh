# about: configure and restart: active after READY, heartbeats with a NodePatchRequest body, state file 0600 in a 0700 directory
# needs: installed
say "configure and restart"
configure 1s
inside systemctl restart exalsius-node-agent
[ "$(inside systemctl is-active exalsius-node-agent)" = active ] || die "not active after restart"
wait_requests 2 10
apilog body || die "heartbeat body"
ok "active after READY; heartbeats arrive with a NodePatchRequest body"
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] || die "state file mode"
[ "$(inside stat -c '%a' /var/lib/exalsius-node-agent)" = 700 ] || die "state dir mode"
ok "state file 0600 exalsius-agent in a 0700 directory"
