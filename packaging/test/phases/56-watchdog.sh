# about: the watchdog: a frozen loop (SIGSTOP) is killed and restarted by systemd
# needs: configured
say "watchdog"
drop_in watchdog.conf
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
pid=$(svc MainPID)
inside kill -STOP "$pid"
wait_new_pid "$pid" 150 || die "watchdog did not fire on a frozen loop"
journal >"$WORK/journal1.txt"
grep -q 'Watchdog timeout' "$WORK/journal1.txt" || die "no watchdog timeout in the journal"
inside rm -f "$UNIT_D/watchdog.conf"
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
ok "watchdog: frozen loop (SIGSTOP) killed and restarted by systemd (PID $pid → $new)"
