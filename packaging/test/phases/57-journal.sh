# about: the journal holds the agent's heartbeat lines and no token
# needs: configured
say "journal"
journal >"$WORK/journal.txt"
grep -q 'heartbeat ok' "$WORK/journal.txt" || die "no heartbeat lines in the journal"
if grep -q 'SECRET' "$WORK/journal.txt"; then die "a token is in the journal"; fi
ok "journalctl shows the agent's lines ($(wc -l <"$WORK/journal.txt") lines), no token in them"
