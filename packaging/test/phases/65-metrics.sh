# about: the metrics textfile under the hardened unit: read-only without the operator's guide's drop-in (one warning), written with it and parsed by prometheus_client (and promtool)
# needs: configured
# arm64: skip metrics textfile (architecture-independent, proven by the x86-64 run)
say "metrics textfile under the hardened unit (docs/operator-guide.md \"Monitoring\")"
inside install -d -m 0755 /var/lib/prometheus/node-exporter
inside chown exalsius-agent /var/lib/prometheus/node-exporter
inside sh -c 'cat >> /etc/exalsius/node-agent.toml' <"$FILES/agent-metrics.toml"
inside systemctl restart exalsius-node-agent
before=$(requests)
wait_requests $((before + 3)) 10
journal >"$WORK/journal-metrics.txt"
grep -q 'metrics: cannot write .*Read-only file system' "$WORK/journal-metrics.txt" \
  || { tail -20 "$WORK/journal-metrics.txt" >&2; die "no warning about the read-only textfile directory"; }
[ "$(grep -c 'metrics: cannot write' "$WORK/journal-metrics.txt")" = 1 ] || die "the metrics warning repeats"
inside test ! -e /var/lib/prometheus/node-exporter/exalsius_node_agent.prom || die "wrote through ProtectSystem=strict?"
ok "without the drop-in: ProtectSystem=strict keeps the directory read-only, one warning, heartbeats go on"
drop_in metrics.conf
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
# The container runs on an ephemeral snapshot (-x): read the file from inside.
prom=$WORK/exalsius_node_agent.prom
read_prom() { inside cat /var/lib/prometheus/node-exporter/exalsius_node_agent.prom >"$prom" 2>/dev/null && [ -s "$prom" ]; }
TIME_SCALE=1 until_true 100 read_prom || { journal_tail; die "no metrics file with the drop-in"; }
[ "$(inside stat -c '%a %U' /var/lib/prometheus/node-exporter/exalsius_node_agent.prom)" = "644 exalsius-agent" ] || die "metrics file mode"
/usr/bin/python3 - "$prom" <<'PY' || die "metrics file does not parse"
import sys
from prometheus_client.parser import text_string_to_metric_families
samples = {s.name: s.value for f in text_string_to_metric_families(open(sys.argv[1]).read()) for s in f.samples}
assert samples["exalsius_node_agent_last_http_status"] == 200, samples
assert samples["exalsius_node_agent_last_success_timestamp_seconds"] > 0, samples
PY
if [ -n "${EXALSIUS_PROMTOOL:-}" ]; then
  "$EXALSIUS_PROMTOOL" check metrics <"$prom" || die "promtool check metrics"
fi
ok "with the operator's guide's drop-in (ReadWritePaths=): the service writes the textfile, 0644, parsed by prometheus_client"
inside rm -f "$UNIT_D/metrics.conf"
inside sed -i '/^\[metrics\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
