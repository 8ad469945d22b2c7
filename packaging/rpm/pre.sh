# exalsius-node-agent %pre: the system user must exist before the config is installed with
# group exalsius-agent.
getent group exalsius-agent >/dev/null || groupadd --system exalsius-agent
getent passwd exalsius-agent >/dev/null || useradd --system --gid exalsius-agent --no-create-home --home-dir /var/lib/exalsius-node-agent --shell /sbin/nologin --comment "exalsius node agent" exalsius-agent
exit 0
