# exalsius-node-agent %preun: $1 = 0 on removal (stop and disable), 1 on upgrade (nothing).
if [ "$1" -eq 0 ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now exalsius-node-agent.service >/dev/null 2>&1 || :
fi
exit 0
