# exalsius-node-agent %postun: $1 = 0 on removal: forget the unit and remove the agent's state.
# (rpm has no purge: an edited config is kept as node-agent.toml.rpmsave by rpm itself.)
if command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload >/dev/null 2>&1 || :
fi
if [ "$1" -eq 0 ]; then
    rm -rf /var/lib/exalsius-node-agent /var/lib/private/exalsius-node-agent
fi
exit 0
