# Static package checks shared by packaging/test-packages.sh (x86-64, phase 40-static) and
# packaging/test-arm64.sh; sourced, uses their ok/die and $WORK. packaging/build.sh sources it
# for highest_glibc.

# lint_packages LABEL DEB RPM: lintian and rpmlint, with the accepted findings.
lint_packages() {
  # Accepted lintian warnings: initial-upload-closes-no-bugs (not a Debian upload) and
  # non-standard-file-perm for the 0640 config (it may hold the token).
  lintian --fail-on error,warning --suppress-tags initial-upload-closes-no-bugs,non-standard-file-perm "$2" \
    || die "lintian ($1)"
  ok "lintian ($1): no errors, no warnings beyond the two accepted"
  rpmlint -c packaging/rpmlint.toml "$3" | tee "$WORK/rpmlint-$1.txt"
  grep -q ' 0 errors, 0 warnings' "$WORK/rpmlint-$1.txt" || die "rpmlint ($1)"
  ok "rpmlint ($1): 0 errors (accepted findings listed in packaging/rpmlint.toml)"
}

# highest_glibc BINARY: the highest GLIBC_ symbol version it needs (packaging/build.sh prints it too).
highest_glibc() {
  readelf -W --dyn-syms "$1" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1
}

# glibc_ceiling LABEL BINARY: the highest GLIBC_ symbol version is at most 2.28.
glibc_ceiling() {
  local max_glibc
  max_glibc=$(highest_glibc "$2")
  [ "$(printf '%s\n2.28\n' "$max_glibc" | sort -V | tail -1)" = "2.28" ] || die "$1 binary needs glibc $max_glibc > 2.28"
  ok "$1: highest GLIBC_ symbol version: $max_glibc (≤ 2.28)"
}

# size_ceiling LABEL BINARY: the shipped binary stays within 6 MiB (issue 22;
# docs/benchmarks.md has what each crate costs, bench/footprint.py measures it).
size_ceiling() {
  local bytes
  bytes=$(stat -c %s "$2")
  [ "$bytes" -le 6291456 ] || die "$1 binary is $bytes bytes > 6 MiB"
  ok "$1: binary $(awk -v b="$bytes" 'BEGIN { printf "%.2f", b / 1048576 }') MiB (≤ 6 MiB)"
}

# audit_info LABEL BINARY: the dependency list cargo auditable embedded is there and readable
# (what trivy, grype and syft read), and names the agent and its HTTP stack.
audit_info() {
  command -v rust-audit-info >/dev/null 2>&1 || cargo install --locked -q rust-audit-info
  rust-audit-info "$2" >"$WORK/audit-$1.json" || die "$1: no audit data in the binary"
  python3 - "$WORK/audit-$1.json" <<'PY' || die "$1: audit data"
import json, sys
d = json.load(open(sys.argv[1]))
names = {p["name"] for p in d["packages"]}
assert {"exalsius-node-agent", "reqwest", "rustls", "tokio"} <= names, sorted(names)
PY
  ok "$1: cargo auditable data readable by rust-audit-info ($(python3 -c 'import json,sys; print(len(json.load(open(sys.argv[1]))["packages"]))' "$WORK/audit-$1.json") crates, section .dep-v0 of $((16#$(readelf -W -S "$2" | sed -n 's/.*\.dep-v0 *PROGBITS *[0-9a-f]* [0-9a-f]* \([0-9a-f]*\).*/\1/p'))) bytes)"
}
