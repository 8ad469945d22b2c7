# about: SIGKILL: systemd restarts the agent, which goes on with the persisted token (no 401)
# needs: configured
say "SIGKILL"
pid=$(svc MainPID)
inside kill -KILL "$pid"
wait_new_pid "$pid" 150 active || die "not restarted after SIGKILL"
before=$(requests)
wait_requests $((before + 2)) 10
apilog resumed "$BOOT" "$before" || die "restart did not use the persisted token"
ok "SIGKILL: systemd restarted it (PID $pid → $new), it used the persisted token, no 401"
