# about: systemctl reload: the same PID, the new heartbeat interval in use
# needs: configured
say "reload"
pid=$(svc MainPID)
inside sed -i 's/^interval = "1s"/interval = "250ms"/' /etc/exalsius/node-agent.toml
before=$(requests)
inside systemctl reload exalsius-node-agent
sleep $((2 * TIME_SCALE))
[ "$(svc MainPID)" = "$pid" ] || die "reload changed the PID"
# The old 1 s interval gives 2 per 2 s, the new 250 ms one 8: at least 5 (per 2 s) tells them apart.
[ $(($(requests) - before)) -ge $((4 * TIME_SCALE + 1)) ] || die "new interval not in use: $(($(requests) - before)) requests in $((2 * TIME_SCALE)) s"
ok "systemctl reload: same PID $pid, new 250 ms interval in use"
