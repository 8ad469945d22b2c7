# exalsius-node-agent %postun: forget the unit. The agent's state (its token) is kept on
# removal, as Debian's `remove` keeps it: reinstalling must not mean re-registering. To wipe it:
#   rm -rf /var/lib/exalsius-node-agent
# (an edited config is kept as node-agent.toml.rpmsave by rpm itself.)
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
exit 0
