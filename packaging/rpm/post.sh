# exalsius-node-agent %post: $1 = 1 on install (enable and start), 2 on upgrade (restart if
# running). An unconfigured agent exits 78 and systemd does not restart it; not an error here.
# The state directory belongs to the service user from the start (see the .deb's postinst).
if [ ! -e /var/lib/exalsius-node-agent ] && [ ! -L /var/lib/exalsius-node-agent ]; then
    install -d -o exalsius-agent -g exalsius-agent -m 0700 /var/lib/exalsius-node-agent
fi
# Taking over from client-hw-info (docs/operator-guide.md "Upgrading from client-hw-info"): on first install,
# when its timer is installed and the agent holds no node yet; before the service starts. A
# failure leaves client-hw-info running.
if [ "$1" -eq 1 ] && [ ! -e /var/lib/exalsius-node-agent/state.json ] \
    && { [ -e /etc/systemd/system/client-hw-info.timer ] || [ -e /usr/lib/systemd/system/client-hw-info.timer ]; }; then
    echo "exalsius-node-agent: client-hw-info is installed: taking over its node (exalsius-node-agent import-legacy)"
    if ! exalsius-node-agent import-legacy; then
        if systemctl is-active --quiet client-hw-info.timer 2>/dev/null; then
            echo "exalsius-node-agent: import-legacy did not complete (see above); client-hw-info keeps running (its timer is active)."
        else
            echo "exalsius-node-agent: import-legacy did not complete (see above) and client-hw-info.timer is NOT active: this node sends no heartbeats; run: systemctl enable --now client-hw-info.timer"
        fi
        echo "exalsius-node-agent: fix it, then run: exalsius-node-agent import-legacy && systemctl restart exalsius-node-agent"
    fi
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable exalsius-node-agent.service >/dev/null 2>&1 || :
        systemctl start exalsius-node-agent.service >/dev/null 2>&1 || :
    else
        systemctl try-restart exalsius-node-agent.service >/dev/null 2>&1 || :
    fi
fi
exit 0
