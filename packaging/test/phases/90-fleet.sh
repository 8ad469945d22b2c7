# about: a fleet host on the signed apt repository (docs/operator-guide.md "Installing on a fleet"): badly signed and changed repositories refused; the previous release installed, upgraded while running, rolled back and upgraded again, a newer state format; the token chain unbroken
# needs: repos absent
# arm64: skip the signed apt repository: install, upgrade and rollback (architecture-independent, proven by the x86-64 run)
say "a fleet host: the signed apt repository (docs/operator-guide.md \"Installing on a fleet\")"
inside rm -rf /var/lib/exalsius-node-agent /etc/exalsius
inside userdel exalsius-agent 2>/dev/null || true
# Only the repository under test (the container is a throw-away snapshot): apt reads no mirror.
inside sh -c 'mkdir -p /root/apt-off && mv /etc/apt/sources.list /etc/apt/sources.list.d/* /root/apt-off/ 2>/dev/null; true'
# The two steps docs/operator-guide.md "Installing on a fleet" gives a host: the keyring and the .sources file.
inside install -m 0644 /mnt/pkg/repos/good/exalsius-archive-keyring.gpg /usr/share/keyrings/exalsius-archive-keyring.gpg
apt_source() { # VARIANT: the repository's exalsius.sources, pointed at REPOS/VARIANT; fresh lists
  inside sh -c "sed 's|/repos/good/|/repos/$1/|' /mnt/pkg/repos/good/exalsius.sources >/etc/apt/sources.list.d/exalsius.sources"
  inside sh -c 'rm -rf /var/lib/apt/lists/* && apt-get clean'
}
for v in wrongkey unsigned; do
  apt_source "$v"
  inside apt-get update >"$WORK/update-$v.log" 2>&1 || true
  case "$v" in
    wrongkey) grep -qE 'NO_PUBKEY|signatures (couldn.t be verified|were invalid)' "$WORK/update-$v.log" ;;
    unsigned) grep -q 'is not signed' "$WORK/update-$v.log" ;;
  esac || { show "$WORK/update-$v.log"; die "apt-get update did not name the $v repository's signature problem"; }
  if inside apt-get install -y -q exalsius-node-agent >"$WORK/install-$v.log" 2>&1; then
    show "$WORK/install-$v.log"; die "apt-get installed from the $v repository"
  fi
  case "$(installed)" in installed*) die "installed from the $v repository" ;; esac
done
ok "a repository signed by another key (NO_PUBKEY) and an unsigned one: apt-get update refuses them, nothing installed"
apt_source tampered
inside apt-get update >"$WORK/update-tampered.log" 2>&1 || { show "$WORK/update-tampered.log"; die "apt-get update (tampered package)"; }
if inside apt-get install -y -q exalsius-node-agent >"$WORK/install-tampered.log" 2>&1; then
  show "$WORK/install-tampered.log"; die "apt-get installed a package changed after signing"
fi
grep -qE 'Hash Sum mismatch|Hashes of expected file' "$WORK/install-tampered.log" \
  || { show "$WORK/install-tampered.log"; die "apt-get refused the changed package without naming the hash"; }
case "$(installed)" in installed*) die "the changed package got installed" ;; esac
ok "a package changed after signing: apt-get install refuses it (hash mismatch), nothing installed"

apt_source good
inside apt-get update >"$WORK/update-good.log" 2>&1 || { show "$WORK/update-good.log"; die "apt-get update (good repository)"; }
if grep -qE '^(W|E):' "$WORK/update-good.log"; then show "$WORK/update-good.log"; die "apt-get update warned about the good repository"; fi
CUR_VERSION=$(dpkg-deb -f "$DEB" Version)
inside apt-cache madison exalsius-node-agent >"$WORK/madison.txt"
grep -q "$PREV_VERSION-1" "$WORK/madison.txt" && grep -q "$CUR_VERSION" "$WORK/madison.txt" \
  || { show "$WORK/madison.txt"; die "apt does not offer both $PREV_VERSION-1 and $CUR_VERSION"; }
ok "apt-get update: the repository verifies against its keyring (signed-by=); $PREV_VERSION-1 and $CUR_VERSION offered"

FLEET_MARKS=
fleet_rows() { apilog count "$FLEET_NODE"; }
fleet_step() { # LABEL VERSION: the agent of VERSION runs, heartbeats rotate with the last token, status says so
  local before n
  before=$(fleet_rows)
  three_more() { [ "$(fleet_rows)" -ge $((before + 3)) ]; }
  until_true 150 three_more || { journal_tail; die "$1: no heartbeats"; }
  n=$(apilog chain "$FLEET_NODE" "$FLEET_TOKEN" "$FLEET_MARKS") || { journal_tail; die "$1: the token chain broke"; }
  [ "$(installed)" = "installed $2" ] || die "$1: dpkg says $(installed), expected $2"
  inside exalsius-node-agent --version | grep -q " ${2%-*}\$" || die "$1: the binary is not ${2%-*}"
  inside exalsius-node-agent status --json >"$WORK/status.json" || { show "$WORK/status.json"; die "$1: status unhealthy"; }
  python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); assert s["node_id"] == sys.argv[2] and s["healthy"] and s["last_result"] == "ok", s' \
    "$WORK/status.json" "$FLEET_NODE" || die "$1: status"
  echo "$1: $n heartbeats of the fleet node so far, each with the last rotated token"
}
# restarted_by LOG WHAT CMD...: CMD (an apt-get) restarts the service; its output in $WORK/LOG.log.
restarted_by() {
  local log=$1 what=$2 pid
  shift 2
  pid=$(svc MainPID)
  FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
  inside "$@" >"$WORK/$log.log" 2>&1 || { show "$WORK/$log.log"; die "$what"; }
  [ "$(svc MainPID)" != "$pid" ] || die "$what did not restart the service"
}

inside apt-get install -y -q exalsius-node-agent="$PREV_VERSION-1" >"$WORK/apt-prev.log" 2>&1 \
  || { show "$WORK/apt-prev.log"; die "apt-get install exalsius-node-agent=$PREV_VERSION-1"; }
render agent-fleet.toml | put /etc/exalsius/node-agent.toml
inside systemctl restart exalsius-node-agent
fleet_step "installed $PREV_VERSION-1 from the repository" "$PREV_VERSION-1"
if inside grep -q '"format"' /var/lib/exalsius-node-agent/state.json; then die "$PREV_VERSION wrote a format number?"; fi
ok "apt-get install exalsius-node-agent=$PREV_VERSION-1 from the repository: heartbeats rotate the token, status healthy"

restarted_by apt-upgrade "apt-get upgrade" apt-get upgrade -y -q
fleet_step "apt-get upgrade to $CUR_VERSION while it ran" "$CUR_VERSION"
inside grep -q '"format": 1' /var/lib/exalsius-node-agent/state.json || die "$CUR_VERSION did not write state format 1"
inside grep -q "$FLEET_NODE" /etc/exalsius/node-agent.toml || die "the upgrade replaced the operator's config"
ok "apt-get upgrade $PREV_VERSION-1 → $CUR_VERSION while running: restarted, the next heartbeat carried the last rotated token, config kept, state now format 1"

restarted_by apt-rollback "the rollback" apt-get install -y -q --allow-downgrades exalsius-node-agent="$PREV_VERSION-1"
fleet_step "rollback to $PREV_VERSION-1" "$PREV_VERSION-1"
ok "rollback (apt-get install exalsius-node-agent=$PREV_VERSION-1 --allow-downgrades): $PREV_VERSION reads the format-1 state, heartbeats with the last rotated token, status healthy"

restarted_by apt-again "the upgrade after the rollback" apt-get install -y -q exalsius-node-agent
fleet_step "upgrade again after the rollback" "$CUR_VERSION"
ok "upgrade again to $CUR_VERSION after the rollback: the token chain holds ($(fleet_rows) heartbeats, every one 200)"
# The next rollback, as this version will see it: a state written by a newer format, with a
# field this version does not know.
inside systemctl stop exalsius-node-agent
inside sed -i 's/"format": 1/"format": 2, "rollout_wave": {"wave": 3}/' /var/lib/exalsius-node-agent/state.json
FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
inside systemctl start exalsius-node-agent
fleet_step "a state from a newer format" "$CUR_VERSION"
journal -n 40 | grep -q 'has format 2, newer than this version' \
  || die "no line saying the state is from a newer version"
inside grep -q '"format": 2' /var/lib/exalsius-node-agent/state.json || die "the newer format number was lowered"
inside grep -q '"rollout_wave"' /var/lib/exalsius-node-agent/state.json || die "a newer version's field was dropped"
ok "a state from a newer format (2, an unknown field): used with a warning, heartbeats go on with its token, saved back with format 2 and the field"
journal >"$WORK/journal-fleet.txt"
if grep -q SECRET "$WORK/journal-fleet.txt" "$WORK"/apt-{prev,upgrade,rollback,again}.log; then die "a token in the journal or apt's output"; fi
inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge after the fleet test"
