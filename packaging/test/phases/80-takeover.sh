# about: take over from client-hw-info on install (import-legacy in the postinst): a failed disable restarts the legacy timer and imports nothing; then the import, the legacy tool without credentials, the imported node's heartbeats
# needs: packages absent
# arm64: skip client-hw-info takeover (architecture-independent, proven by the x86-64 run)
say "take over from client-hw-info on install (import-legacy in the postinst)"
# The old tool as it left machines: a root timer every 15 minutes, its one-shot service, and
# root's config.env with the latest rotated token (the stand-in accepts only that one). The
# fake binary records each run that found credentials.
put /usr/local/bin/client-hw-info 755 <"$FILES/client-hw-info"
put /etc/systemd/system/client-hw-info.service <"$FILES/client-hw-info.service"
put /etc/systemd/system/client-hw-info.timer <"$FILES/client-hw-info.timer"
inside mkdir -p /root/.config/exalsius
render legacy-config.env | put /root/.config/exalsius/config.env
inside systemctl daemon-reload
inside systemctl enable --now client-hw-info.timer >/dev/null 2>&1
inside systemctl start client-hw-info.service
inside test -s /var/log/client-hw-info.runs || die "the fake legacy tool did not run"
[ "$(inside systemctl is-active client-hw-info.timer)" = active ] || die "legacy timer not active"
# The operator's config management put the agent's config in place first (api.url only).
operator_config
# First with `systemctl disable` failing after `stop` worked (a read-only timers.target.wants):
# the import must start the legacy timer again, change nothing, and the postinst say so.
inside mount --bind /etc/systemd/system/timers.target.wants /etc/systemd/system/timers.target.wants
inside mount -o remount,ro,bind /etc/systemd/system/timers.target.wants
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy-fail.log" 2>&1 \
  || { show "$WORK/apt-legacy-fail.log"; die "apt-get install with a failing disable"; }
inside umount /etc/systemd/system/timers.target.wants
grep -q "is enabled and running again" "$WORK/apt-legacy-fail.log" || { show "$WORK/apt-legacy-fail.log"; die "import-legacy did not say it restarted the legacy timer"; }
grep -q "client-hw-info keeps running (its timer is active)" "$WORK/apt-legacy-fail.log" || { show "$WORK/apt-legacy-fail.log"; die "the postinst did not say client-hw-info keeps running"; }
[ "$(inside systemctl is-active client-hw-info.timer || true)" = active ] || die "legacy timer left stopped after a failed import"
inside test -f /root/.config/exalsius/config.env || die "config.env renamed although nothing was imported"
inside test ! -e /var/lib/exalsius-node-agent/state.json || die "state written although the import failed"
inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge after the failed import"
operator_config
ok "a failed disable after a working stop: the legacy timer runs again, nothing imported, and the postinst says so"
: >"$API_LOG"
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy.log" 2>&1 \
  || { show "$WORK/apt-legacy.log"; die "apt-get install over client-hw-info"; }
grep -q 'taking over its node' "$WORK/apt-legacy.log" || { show "$WORK/apt-legacy.log"; die "the postinst did not run import-legacy"; }
grep -q "imported node $LEGACY_NODE" "$WORK/apt-legacy.log" || { show "$WORK/apt-legacy.log"; die "import-legacy did not import"; }
if grep -q SECRET "$WORK/apt-legacy.log"; then die "the install printed a token"; fi
ok "apt-get install: the postinst imported client-hw-info's node $LEGACY_NODE (no token printed)"
[ "$(inside systemctl is-enabled client-hw-info.timer || true)" = disabled ] || die "legacy timer still enabled"
[ "$(inside systemctl is-active client-hw-info.timer || true)" = inactive ] || die "legacy timer still active"
inside test ! -e /root/.config/exalsius/config.env || die "config.env not renamed"
inside test -f /root/.config/exalsius/config.env.migrated || die "no config.env.migrated"
runs=$(inside sh -c 'wc -l </var/log/client-hw-info.runs')
inside systemctl start client-hw-info.service 2>/dev/null && die "the legacy tool still runs with credentials"
[ "$(inside sh -c 'wc -l </var/log/client-hw-info.runs')" = "$runs" ] || die "the legacy tool ran again with credentials"
ok "client-hw-info.timer stopped and disabled, config.env renamed: the legacy tool finds no credentials"
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] || die "imported state owner/mode"
two_requests() { [ "$(requests)" -ge 2 ]; }
TIME_SCALE=1 until_true 100 two_requests || true
apilog takeover "$LEGACY_NODE" "$LEGACY_TOKEN" || { journal_tail; die "first heartbeats after the takeover"; }
ok "the service started with the imported node: the first heartbeat carried the legacy token, the next a rotated one"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt4.log" 2>&1 || { show "$WORK/apt4.log"; die "purge"; }
inside rm -rf /etc/systemd/system/client-hw-info.service /etc/systemd/system/client-hw-info.timer /root/.config/exalsius
inside systemctl daemon-reload
