#!/usr/bin/env bash
# Threads of a running agent whose resolver never answers, sampled once a minute.
#   bash bench/hanging-resolver.sh BINARY [MINUTES]      (default 10; needs root for unshare)
# The agent runs in a network + mount namespace of its own whose /etc/resolv.conf points at a
# local UDP socket that swallows every query (the host's configuration is untouched), with a
# 1 s interval and a 1 s backoff cap, so it starts a lookup every second.
set -euo pipefail
bin=$(realpath "$1")
minutes=${2:-10}
work=$(mktemp -d)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$work"' EXIT
printf 'nameserver 127.0.0.1\noptions timeout:30 attempts:5\n' >"$work/resolv.conf"
cat >"$work/agent.toml" <<EOF
[api]
url = "https://api.hang.test/v1"
node_id = "0d9c2f4e-8a51-4c1b-9e62-3f7a1b2c4d5e"
access_token = "bench"
[heartbeat]
interval = "1s"
initial_backoff = "1s"
max_backoff = "1s"
[inventory]
gpu = "off"
[state]
dir = "$work/state"
[log]
level = "error"
EOF
unshare --net --mount sh -c '
  set -e
  ip link set lo up
  mount --bind "$1/resolv.conf" /etc/resolv.conf
  timeout '"$((minutes * 60 + 60))"' python3 -c "import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((\"127.0.0.1\", 53))
time.sleep(86400)" &
  sleep 0.3
  exec "$2" --config "$1/agent.toml" run
' sh "$work" "$bin" 2>"$work/err" &
pid=$!
sleep 1
echo "minute threads"
for m in $(seq 0 "$minutes"); do
  [ "$m" -gt 0 ] && sleep 60
  echo "$m $(awk '/^Threads:/ {print $2}' "/proc/$pid/status")"
done
start=$(date +%s%N)
kill -TERM "$pid"
wait "$pid" || true
echo "SIGTERM → exit: $(( ($(date +%s%N) - start) / 1000000 )) ms"
