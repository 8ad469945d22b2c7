#!/usr/bin/env bash
# The proof for the unit and the packages, run by .ci/run:
#   1. build the .deb and .rpm (and a -2 revision of the .deb for the upgrade test), and the
#      previous release (packaging/previous-release, cached); the signed apt and yum
#      repositories of both (packaging/repo.sh, throw-away keys) and badly signed copies;
#      rpm -K and dnf against the signed RPM side;
#   2. lintian, rpmlint, the glibc symbol ceiling, rpm metadata, systemd-analyze security;
#   3. boot a real systemd (Debian bookworm minbase, debootstrap, cached) with systemd-nspawn
#      and, as an operator would: install, configure, restart, reload, SIGKILL, watchdog,
#      journal, upgrade, purge; then the .rpm with rpm -i --nodeps in the same container; then
#      a fleet host: badly signed repositories refused, the previous release installed from
#      the signed apt repository, upgraded while running, rolled back and upgraded again, the
#      token chain unbroken at the stand-in API.
# A stand-in for the API runs on the host's 127.0.0.1, which the container shares.
# Cleans up what it started. Needs root.
#
#   bash packaging/test-packages.sh                 all of the above for x86-64
#   bash packaging/test-packages.sh --arch arm64    the booted-systemd checks for the arm64 .deb
#       (built before by packaging/build.sh), in the arm64 root that packaging/test-arm64.sh
#       makes, booted through binfmt_misc + qemu-user; waits are scaled by TIME_SCALE (default
#       5 there). Skipped there, with the reason printed: the static checks (test-arm64.sh does
#       them), the metrics drop-in, the upgrade, the client-hw-info takeover and the .rpm —
#       architecture-independent scripts already proven on x86-64.
set -euo pipefail
cd "$(dirname "$0")/.."

ARCH=amd64
if [ "${1:-}" = --arch ]; then
  ARCH=$2
  shift 2
fi
case "$ARCH" in amd64 | arm64) ;; *) echo "--arch amd64|arm64, not $ARCH" >&2; exit 2 ;; esac
PKG=$PWD/target/packages
CACHE=${EXALSIUS_CI_CACHE:-/var/cache/exalsius-ci}
if [ "$ARCH" = amd64 ]; then
  ROOT=$CACHE/bookworm-root
  TIME_SCALE=${TIME_SCALE:-1}
else
  ROOT=$CACHE/bookworm-arm64-root
  TIME_SCALE=${TIME_SCALE:-5}
fi
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NODE=3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b
BOOT=bootstrap-SECRET-token-42
REGTOKEN=register-SECRET-token-7
REG_NODE=5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d
LEGACY_NODE=9d8c7b6a-5f4e-4d3c-8b2a-1f0e9d8c7b6a
LEGACY_TOKEN=legacy-SECRET-token-9
WORK=$(mktemp -d)
API_LOG=$WORK/api.jsonl
checks=0

say() { printf '\n== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf 'ok   %s%s\n' "$*" "$([ "$ARCH" = amd64 ] || echo " [$ARCH, booted under qemu-user]")"; }
die() { printf 'FAIL %s\n' "$*" >&2; exit 1; }

STANDIN_PID=
NSPAWN_PID=
CPID=
cleanup() {
  set +e
  if [ -n "$CPID" ] && kill -0 "$CPID" 2>/dev/null; then
    nsenter -t "$CPID" -a systemctl poweroff >/dev/null 2>&1
    for _ in $(seq 50); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
  fi
  [ -n "$NSPAWN_PID" ] && kill "$NSPAWN_PID" 2>/dev/null
  [ -n "$STANDIN_PID" ] && kill "$STANDIN_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

say "tools"
missing=()
for tool in lintian:lintian rpmlint:rpmlint debootstrap:debootstrap systemd-nspawn:systemd-container \
            rpm:rpm objdump:binutils nsenter:util-linux apt-ftparchive:apt-utils createrepo_c:createrepo-c \
            dnf:dnf gpg:gnupg gpgv:gpgv; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

amd64_only() { # WHAT: true on x86-64; on arm64 says why the section is skipped
  [ "$ARCH" = amd64 ] && return 0
  printf 'skip %s (arm64): architecture-independent, proven by the x86-64 run\n' "$1"
  return 1
}

if [ "$ARCH" = amd64 ]; then
say "build"
rm -rf "$PKG"
bash packaging/build.sh "$PKG" >"$WORK/build1.log" 2>&1 || { cat "$WORK/build1.log"; die "build"; }
DEB_REVISION=2 bash packaging/build.sh --arch amd64 "$PKG/upgrade" >"$WORK/build2.log" 2>&1 || { cat "$WORK/build2.log"; die "build -2"; }
DEB=$(ls "$PKG"/exalsius-node-agent_*-1_amd64.deb)
DEB2=$(ls "$PKG"/upgrade/exalsius-node-agent_*-2_amd64.deb)
RPM=$(ls "$PKG"/exalsius-node-agent-*.x86_64.rpm)
ok "built $(basename "$DEB"), $(basename "$DEB2"), $(basename "$RPM")"

say "the previous release and the signed repositories (packaging/repo.sh)"
# The release before this one (packaging/previous-release), built from its commit once per
# machine: the upgrade → rollback test installs it from the repository.
read -r PREV_VERSION PREV_COMMIT < <(grep -v '^#' packaging/previous-release)
prev=$CACHE/previous-release/$PREV_COMMIT
if ! compgen -G "$prev/exalsius-node-agent_${PREV_VERSION}-1_amd64.deb" >/dev/null; then
  git cat-file -e "$PREV_COMMIT^{commit}" 2>/dev/null \
    || die "the previous release's commit $PREV_COMMIT is not in this clone (a shallow clone? git fetch --unshallow)"
  git clone -q "$PWD" "$WORK/prev" && git -C "$WORK/prev" -c advice.detachedHead=false checkout -q "$PREV_COMMIT"
  rm -rf "$prev.tmp"
  (cd "$WORK/prev" && bash packaging/build.sh --arch amd64 "$prev.tmp") >"$WORK/build-prev.log" 2>&1 \
    || { tail -30 "$WORK/build-prev.log"; die "build of the previous release $PREV_VERSION ($PREV_COMMIT)"; }
  rm -rf "$prev" "$WORK/prev"
  mv "$prev.tmp" "$prev"
fi
PREV_DEB=$(ls "$prev"/exalsius-node-agent_"$PREV_VERSION"-1_amd64.deb)
PREV_RPM=$(ls "$prev"/exalsius-node-agent-"$PREV_VERSION"-1.x86_64.rpm)
# Throw-away keys: the repository's and another one (the "wrongly signed" repository).
keys() { # NAME: a GnuPG home $WORK/NAME with one unprotected signing key, exported to $WORK/NAME.sec
  install -d -m 700 "$WORK/$1"
  GNUPGHOME=$WORK/$1 gpg --batch --quiet --passphrase '' --quick-gen-key "exalsius $1 test key <$1@invalid>" rsa3072 sign 1d
  GNUPGHOME=$WORK/$1 gpg --batch --quiet --export-secret-keys >"$WORK/$1.sec"
}
keys good
keys other
REPOS=$PKG/repos
rm -rf "$REPOS"
mkdir -p "$REPOS"
bash packaging/repo.sh --key-file "$WORK/good.sec" --url "file:///mnt/pkg/repos/good" "$REPOS/good" \
  "$PREV_DEB" "$PREV_RPM" "$PKG"/*.deb "$PKG"/*.rpm >"$WORK/repo.log" 2>&1 || { cat "$WORK/repo.log"; die "repo.sh"; }
for f in apt/dists/stable/InRelease apt/dists/stable/Release.gpg apt/dists/stable/main/binary-amd64/Packages.gz \
         apt/dists/stable/main/binary-arm64/Packages.gz rpm/x86_64/repodata/repomd.xml.asc \
         rpm/aarch64/repodata/repomd.xml.asc exalsius-archive-keyring.gpg RPM-GPG-KEY-exalsius; do
  [ -s "$REPOS/good/$f" ] || die "the repository lacks $f"
done
gpgv --keyring "$REPOS/good/exalsius-archive-keyring.gpg" "$REPOS/good/apt/dists/stable/InRelease" 2>/dev/null \
  || die "InRelease does not verify against the exported keyring"
if GNUPGHOME=$WORK/good gpg --batch --list-packets "$REPOS/good/exalsius-archive-keyring.gpg" 2>/dev/null | grep -q 'secret key packet'; then
  die "the published keyring holds a secret key"
fi
[ "$(grep -c '^Version: ' "$REPOS/good/apt/dists/stable/main/binary-amd64/Packages")" = 2 ] || die "amd64 Packages should list $PREV_VERSION and this build"
ok "repo.sh: apt (InRelease, Release.gpg, Packages for amd64 and arm64) and yum (repodata, repomd.xml.asc for x86_64 and aarch64), public key only; $PREV_VERSION-1 and $(dpkg-deb -f "$DEB" Version) side by side"
# What an operator gets wrong: each refused with a line naming it, before anything is written.
install -d -m 700 "$WORK/locked"
GNUPGHOME=$WORK/locked gpg --batch --quiet --pinentry-mode loopback --passphrase hunter2 \
  --quick-gen-key 'exalsius locked test key <locked@invalid>' rsa3072 sign 1d
GNUPGHOME=$WORK/locked gpg --batch --quiet --pinentry-mode loopback --passphrase hunter2 --export-secret-keys >"$WORK/locked.sec"
cat "$WORK/good.sec" "$WORK/other.sec" >"$WORK/two.sec"
refused() { # EXPECTED-MESSAGE ARGS...: repo.sh exits 1 saying so and leaves no repository behind
  local want=$1
  shift
  if bash packaging/repo.sh "$@" >"$WORK/refused.log" 2>&1 </dev/null; then
    die "repo.sh accepted $*"
  fi
  grep -q "$want" "$WORK/refused.log" || { cat "$WORK/refused.log"; die "repo.sh $*: expected '$want'"; }
  [ ! -e "$WORK/badrepo" ] || die "repo.sh $* left $WORK/badrepo behind"
}
bad=$WORK/badrepo
refused "no signing key" "$bad" "$DEB"
refused "cannot sign without a passphrase" --key-file "$WORK/locked.sec" "$bad" "$DEB"
refused "not an OpenPGP key" --key-file packaging/changelog "$bad" "$DEB"
refused "2 secret keys .*choose one with --key" --key-file "$WORK/two.sec" "$bad" "$DEB"
refused "no secret key matching nobody@invalid" --gnupghome "$WORK/good" --key nobody@invalid "$bad" "$DEB"
refused "neither a .deb nor an .rpm" --key-file "$WORK/good.sec" "$bad" "$DEB" "$PKG/SHA256SUMS"
refused "no such file" --key-file "$WORK/good.sec" "$bad" "$PKG/absent.deb"
ok "repo.sh refuses, naming the problem and writing nothing: no key, a key that needs a passphrase, a file that is no key, two keys without --key, an unknown --key, a file that is no package, a missing one"
# Publishing the same build again changes nothing a host sees; another build under a version
# already published is refused, the repository left as it was.
cp "$REPOS/good/apt/dists/stable/main/binary-amd64/Packages" "$WORK/Packages.before"
cp "$REPOS/good/rpm/x86_64/repodata/repomd.xml" "$WORK/repomd.before"
bash packaging/repo.sh --key-file "$WORK/good.sec" "$REPOS/good" "$DEB" "$RPM" >"$WORK/again.log" 2>&1 \
  || { cat "$WORK/again.log"; die "repo.sh with packages already there"; }
cmp -s "$WORK/Packages.before" "$REPOS/good/apt/dists/stable/main/binary-amd64/Packages" || die "re-adding the same build changed the apt index"
diff <(grep -v '<revision>\|<timestamp>' "$WORK/repomd.before") <(grep -v '<revision>\|<timestamp>' "$REPOS/good/rpm/x86_64/repodata/repomd.xml") >/dev/null \
  || die "re-adding the same build changed the yum metadata (re-signed the .rpm?)"
cp "$DEB" "$WORK/rebuilt.deb"
printf 'X' | dd of="$WORK/rebuilt.deb" bs=1 seek=$(($(stat -c %s "$DEB") - 4096)) conv=notrunc 2>/dev/null
cp "$REPOS/good/apt/dists/stable/InRelease" "$WORK/InRelease.before"
bash packaging/repo.sh --key-file "$WORK/good.sec" "$REPOS/good" "$WORK/rebuilt.deb" >"$WORK/rebuilt.log" 2>&1 \
  && die "repo.sh published another build under a version already there"
grep -q "is another build under the same version" "$WORK/rebuilt.log" || { cat "$WORK/rebuilt.log"; die "repo.sh did not say why"; }
cmp -s "$WORK/InRelease.before" "$REPOS/good/apt/dists/stable/InRelease" || die "the refused run changed the repository"
cmp -s "$DEB" "$REPOS/good/apt/pool/main/$(basename "$DEB")" || die "the refused run replaced the published package"
# Two release jobs at once on one directory: the second is refused, not interleaved.
flock -o "$REPOS/good" sleep 60 &
holder=$!
for _ in $(seq 50); do flock -n "$REPOS/good" true || break; sleep 0.1; done
bash packaging/repo.sh --key-file "$WORK/good.sec" "$REPOS/good" "$DEB" >"$WORK/locked.log" 2>&1 \
  && { kill "$holder"; die "repo.sh ran while another held the repository"; }
kill "$holder"; wait "$holder" 2>/dev/null || true
grep -q "another repo.sh is updating" "$WORK/locked.log" || { cat "$WORK/locked.log"; die "repo.sh did not say another one is running"; }
cmp -s "$WORK/InRelease.before" "$REPOS/good/apt/dists/stable/InRelease" || die "the locked-out run changed the repository"
ok "repo.sh again with the same build: the apt index and the yum metadata unchanged (the .rpm not signed twice); another build under a published version (another file name): refused, the repository untouched; a second repo.sh while one runs: refused"
# The badly signed variants apt must refuse: signed by another key, not signed, and a
# package changed after signing.
cp -a "$REPOS/good" "$REPOS/wrongkey"
(export GNUPGHOME=$WORK/other
 gpg --batch --yes --quiet --clearsign -o "$REPOS/wrongkey/apt/dists/stable/InRelease" "$REPOS/wrongkey/apt/dists/stable/Release"
 gpg --batch --yes --quiet --detach-sign --armor -o "$REPOS/wrongkey/apt/dists/stable/Release.gpg" "$REPOS/wrongkey/apt/dists/stable/Release"
 gpg --batch --yes --quiet --detach-sign --armor -o "$REPOS/wrongkey/rpm/x86_64/repodata/repomd.xml.asc" "$REPOS/wrongkey/rpm/x86_64/repodata/repomd.xml")
cp -a "$REPOS/good" "$REPOS/unsigned"
rm "$REPOS/unsigned/apt/dists/stable/InRelease" "$REPOS/unsigned/apt/dists/stable/Release.gpg"
cp -a "$REPOS/good" "$REPOS/tampered"
for d in "$REPOS/tampered/apt/pool/main/$(basename "$DEB")" "$REPOS"/tampered/rpm/x86_64/*-1.x86_64.rpm; do
  # One byte of the payload changed, the size kept.
  printf 'X' | dd of="$d" bs=1 seek=$(($(stat -c %s "$d") - 4096)) conv=notrunc 2>/dev/null
done

say "the RPM side: rpm -K against the exported key, dnf against the signed repodata"
rpmdb=$WORK/rpmdb
mkdir -p "$rpmdb"
for r in "$REPOS"/good/rpm/*/*.rpm; do
  rpm --dbpath "$rpmdb" -K "$r" >"$WORK/rpmk.txt" 2>&1 && die "rpm -K passed $(basename "$r") before the key was imported"
done
rpm --dbpath "$rpmdb" --import "$REPOS/good/RPM-GPG-KEY-exalsius"
for r in "$REPOS"/good/rpm/*/*.rpm; do
  rpm --dbpath "$rpmdb" -Kv "$r" >"$WORK/rpmk.txt" 2>&1 || { cat "$WORK/rpmk.txt"; die "rpm -K $(basename "$r")"; }
  grep -q 'Signature, key ID .*: OK' "$WORK/rpmk.txt" || { cat "$WORK/rpmk.txt"; die "$(basename "$r") carries no signature rpm checked"; }
done
for r in "$REPOS"/tampered/rpm/x86_64/*-1.x86_64.rpm "$RPM"; do
  # A changed package fails; the unsigned build output passes only its digests (no "signatures OK").
  if rpm --dbpath "$rpmdb" -K "$r" 2>&1 | grep -q 'signatures OK'; then die "rpm -K: $r passes as signed"; fi
done
ok "rpm -K: both signed .rpms OK against RPM-GPG-KEY-exalsius (and NOT OK before it is imported); a changed payload fails"
dnf_repo() { # VARIANT: dnf's view of REPOS/VARIANT/rpm/x86_64 with repo_gpgcheck=1, gpgkey= the good key
  local d=$WORK/dnf-$1
  rm -rf "$d"
  mkdir -p "$d/repos"
  printf '[exalsius]\nname=exalsius\nbaseurl=file://%s\nenabled=1\ngpgcheck=1\nrepo_gpgcheck=1\ngpgkey=file://%s\n' \
    "$REPOS/$1/rpm/x86_64" "$REPOS/good/RPM-GPG-KEY-exalsius" >"$d/repos/exalsius.repo"
  dnf -y --installroot "$d/root" --setopt=reposdir="$d/repos" --releasever 9 --forcearch x86_64 \
    repoquery --qf '%{version}-%{release}' exalsius-node-agent
}
dnf_repo good >"$WORK/dnf.out" 2>"$WORK/dnf.err" || { cat "$WORK/dnf.err"; die "dnf repoquery (good repository)"; }
grep -qx "$(rpm -qp --qf '%{VERSION}-%{RELEASE}' "$RPM" 2>/dev/null)" "$WORK/dnf.out" && grep -qx "$PREV_VERSION-1" "$WORK/dnf.out" \
  || { cat "$WORK/dnf.out" "$WORK/dnf.err"; die "dnf does not offer both versions from the signed repository"; }
# dnf's repoquery exits 0 when it ignores a repository: what it printed decides.
dnf_repo wrongkey >"$WORK/dnf-wrong.out" 2>"$WORK/dnf-wrong.err" || true
if grep -q '^[0-9]' "$WORK/dnf-wrong.out" || ! grep -q 'GPG signature verification error' "$WORK/dnf-wrong.err"; then
  cat "$WORK/dnf-wrong.out" "$WORK/dnf-wrong.err"; die "dnf used repodata signed by another key, or did not say why it refused it"
fi
ok "dnf (repo_gpgcheck=1): reads the repodata signed by the repository's key ($PREV_VERSION-1 and this build offered); refuses it signed by another key"

say "static checks"
. packaging/checks.sh
lint_packages amd64 "$DEB" "$RPM"
glibc_ceiling amd64 target/assets/exalsius-node-agent
size_ceiling amd64 target/assets/exalsius-node-agent
hot_text amd64 target/assets/exalsius-node-agent 90
audit_info amd64 target/assets/exalsius-node-agent
objdump -p target/assets/exalsius-node-agent >"$WORK/objdump.txt"
grep -q 'NEEDED *libc.so.6' "$WORK/objdump.txt" || die "binary is not dynamically linked against glibc"
ok "dynamically linked against glibc (can dlopen libnvidia-ml.so.1)"
depends=$(dpkg-deb -f "$DEB" Depends)
requires=$(rpm -qp --requires "$RPM" 2>/dev/null)
grep -q 'libc6 (>= 2.28)' <<<"$depends" || die "deb Depends lacks libc6 (>= 2.28)"
grep -q 'procps' <<<"$depends" || die "deb Depends lacks procps (/bin/kill)"
grep -q 'glibc >= 2.28' <<<"$requires" || die "rpm Requires lacks glibc >= 2.28"
ok "dependencies: libc6 (>= 2.28), procps / glibc >= 2.28"
dpkg-deb -I "$DEB" conffiles >"$WORK/conffiles"
rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEGROUPNAME}\n]' "$RPM" >"$WORK/rpm.files" 2>/dev/null
grep -qx '/etc/exalsius/node-agent.toml' "$WORK/conffiles" || die "deb conffile"
grep -qx '/etc/exalsius/node-agent.toml cn -rw-r----- exalsius-agent' "$WORK/rpm.files" || die "rpm %config(noreplace) 0640"
ok "config is a conffile / %config(noreplace), 0640 root:exalsius-agent"
dpkg-deb -c "$DEB" >"$WORK/deb.list"
rpm -qlp "$RPM" >"$WORK/rpm.list" 2>/dev/null
for f in /usr/bin/exalsius-node-agent /usr/share/man/man1/exalsius-node-agent.1.gz \
         /usr/share/bash-completion/completions/exalsius-node-agent /usr/share/doc/exalsius-node-agent/README.md \
         /usr/share/doc/exalsius-node-agent/operator-guide.md; do
  grep -q " \.$f\$" "$WORK/deb.list" || die "deb lacks $f"
  grep -qx "$f" "$WORK/rpm.list" || die "rpm lacks $f"
done
ok "both packages ship binary, man page, completions, README, operator's guide"
rpm -qp --scripts "$RPM" >"$WORK/rpm.scripts" 2>/dev/null
for s in preinstall postinstall preuninstall postuninstall; do
  grep -q "^$s scriptlet" "$WORK/rpm.scripts" || die "rpm lacks %$s"
done
ok "rpm has %pre/%post/%preun/%postun"
systemd-analyze security --offline=true --threshold=20 --no-pager systemd/exalsius-node-agent.service \
  | tee "$WORK/security.txt" | tail -1
grep -q 'Overall exposure level' "$WORK/security.txt" || die "systemd-analyze security"
ok "systemd-analyze security --offline=true --threshold=20 passes"
else
  DEB=$(ls "$PKG"/exalsius-node-agent_*-1_arm64.deb)
  [ -x "$ROOT/lib/systemd/systemd" ] && [ -x "$ROOT/usr/bin/dbus-daemon" ] \
    || die "no bootable arm64 root at $ROOT (packaging/test-arm64.sh makes it)"
fi

say "booted systemd ($ARCH)"
if [ ! -x "$ROOT/lib/systemd/systemd" ]; then
  rm -rf "$ROOT.tmp"
  mkdir -p "$CACHE"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps,ca-certificates,rpm,passwd \
    bookworm "$ROOT.tmp" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log"; die "debootstrap"; }
  mv "$ROOT.tmp" "$ROOT"
fi
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
python3 packaging/standin_api.py "$port" "$API_LOG" "$NODE" "$BOOT" "$REGTOKEN" &
STANDIN_PID=$!
touch "$API_LOG"
machine=agenttest-$$
# A pure cgroup v2 tree for the container, and bpf() allowed in it: systemd applies DevicePolicy=
# and DeviceAllow= as BPF device programs there (in nspawn's default hybrid tree the v1 devices
# controller is read-only, the unit's device policy would silently not apply, and the GPU
# checks below would prove nothing).
SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 systemd-nspawn -q -D "$ROOT" -x --boot --register=no --keep-unit \
  --console=passive -M "$machine" --system-call-filter=bpf --capability=CAP_BPF,CAP_PERFMON,CAP_NET_ADMIN \
  --bind-ro="$PKG":/mnt/pkg >"$WORK/nspawn.log" 2>&1 &
NSPAWN_PID=$!
# -x copies the root first where the file system cannot snapshot it (ext4: ~400 MB), which on
# a loaded machine takes more than a few seconds.
for _ in $(seq $((1200 * TIME_SCALE))); do
  CPID=$(pgrep -P "$NSPAWN_PID" -x systemd || true)
  [ -n "$CPID" ] && break
  kill -0 "$NSPAWN_PID" 2>/dev/null || break
  sleep 0.1
done
[ -n "$CPID" ] || { cat "$WORK/nspawn.log"; die "container did not boot"; }
inside() { nsenter -t "$CPID" -a "$@"; }
state=
for _ in $(seq $((120 * TIME_SCALE))); do
  # Early on the container's bus is not up yet: "Failed to connect to bus".
  state=$(timeout 60 nsenter -t "$CPID" -a systemctl is-system-running --wait 2>/dev/null || true)
  case "$state" in running | degraded) break ;; esac
  sleep 0.25
done
case "$state" in running | degraded) ;; *) die "container system state: $state" ;; esac
ok "container booted: systemd $state"

# Helpers reading the stand-in's log.
requests() { wc -l <"$API_LOG"; }
wait_requests() { # N TIMEOUT_S
  for _ in $(seq $(($2 * 10 * TIME_SCALE))); do [ "$(requests)" -ge "$1" ] && return 0; sleep 0.1; done
  die "expected $1 requests at the stand-in, got $(requests)"
}
svc() { inside systemctl show -p "$1" --value exalsius-node-agent; }
wait_prop() { # PROP VALUE TIMEOUT_S
  for _ in $(seq $(($3 * 10 * TIME_SCALE))); do [ "$(svc "$1")" = "$2" ] && return 0; sleep 0.1; done
  die "$1 is $(svc "$1"), expected $2"
}
configure() { # INTERVAL
  inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"
node_id = "$NODE"
access_token = "$BOOT"

[heartbeat]
interval = "$1"
jitter = 0.0
initial_backoff = "200ms"
max_backoff = "2s"
EOF
}

if [ "$ARCH" = arm64 ]; then
  # Emulation limits, not the unit's: qemu-user runs threads of its own, so the kernel refuses
  # the emulated systemd's unshare(CLONE_NEWUSER) (EINVAL, "Failed to set up user namespacing")
  # and its IPC-namespace set-up fails (EIO). Only these two, and only under qemu-user; on
  # arm64 hardware the unit runs as shipped (the same file as on x86-64, proven above it).
  inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
  printf '[Service]\nPrivateUsers=no\nPrivateIPC=no\n' \
    | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/qemu-user.conf'
  echo "arm64 under qemu-user: the unit runs with PrivateUsers=no and PrivateIPC=no (qemu-user cannot emulate them)"
fi

say "install the .deb"
inside apt-get install -y -q /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt1.log" 2>&1 || { cat "$WORK/apt1.log"; die "apt-get install"; }
[ "$(inside systemctl is-enabled exalsius-node-agent)" = enabled ] || die "unit not enabled"
ok "apt-get install: unit enabled"
wait_prop ExecMainStatus 78 10
sleep 6 # RestartSec=5s: a restart would have happened by now
[ "$(svc NRestarts)" = 0 ] || die "unconfigured agent restarted $(svc NRestarts) times"
[ "$(svc ActiveState)" = failed ] || die "unconfigured agent: $(svc ActiveState)"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal0.txt"
grep -q 'in /etc/exalsius/node-agent.toml' "$WORK/journal0.txt" || die "no message naming the file to edit"
ok "unconfigured: exit 78, no restart loop, journal names /etc/exalsius/node-agent.toml"
inside systemd-analyze verify --man=no exalsius-node-agent.service >"$WORK/verify.out" 2>"$WORK/verify.err" || true
[ ! -s "$WORK/verify.err" ] || { cat "$WORK/verify.err"; die "systemd-analyze verify"; }
ok "systemd-analyze verify: empty stderr"
[ "$(inside stat -c '%a %U:%G' /etc/exalsius/node-agent.toml)" = "640 root:exalsius-agent" ] || die "config mode"
grep -q ':/var/lib/exalsius-node-agent:/usr/sbin/nologin$' <<<"$(inside getent passwd exalsius-agent)" || die "user"
ok "system user exalsius-agent (nologin, home /var/lib/exalsius-node-agent); config 0640 root:exalsius-agent"

say "register as root, then systemctl enable --now (the README's flow, verbatim but for sudo)"
inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"

[heartbeat]
interval = "1s"
jitter = 0.0
EOF
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent)" = "700 exalsius-agent" ] || die "state dir not the service user's"
inside env EXALSIUS_REGISTER_TOKEN="$REGTOKEN" exalsius-node-agent register \
  --endpoint 192.0.2.7:22 --username ubuntu --ssh-key-id KEY_ID >"$WORK/register.log" 2>&1 \
  || { cat "$WORK/register.log"; die "register as root"; }
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] \
  || die "root's register left $(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)"
ok "register as root: state.json 0600 owned by exalsius-agent in its 0700 directory"
inside systemctl enable --now exalsius-node-agent
beats() { python3 - "$API_LOG" "$REG_NODE" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows and rows[0]["method"] == "POST" and rows[0]["status"] == 201, rows[:1]
beats = [r for r in rows if r["node"] == sys.argv[2]]
assert all(r["status"] == 200 for r in beats), beats
print(len(beats))
EOF
}
for _ in $(seq $((100 * TIME_SCALE))); do [ "$(beats 2>/dev/null || echo 0)" -ge 2 ] && break; sleep 0.1; done
[ "$(beats)" -ge 2 ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "registered node did not heartbeat"; }
[ "$(svc ExecMainStatus)" != 78 ] || die "service exited 78"
[ "$(inside stat -c '%U' /var/lib/exalsius-node-agent/state.json)" = exalsius-agent ] || die "state owner"
ok "systemctl enable --now: the service reads the registration and heartbeats rotate its token"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/state.json
: >"$API_LOG"

say "configure and restart"
configure 1s
inside systemctl restart exalsius-node-agent
[ "$(inside systemctl is-active exalsius-node-agent)" = active ] || die "not active after restart"
wait_requests 2 10
python3 - "$API_LOG" <<'EOF' || die "heartbeat body"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert all(r["status"] == 200 for r in rows), rows
b = rows[0]["body"]
assert set(b) >= {"hardware", "software", "system"}, b
assert b["hardware"]["cpu_cores"] >= 1 and b["system"]["kernel"], b
EOF
ok "active after READY; heartbeats arrive with a NodePatchRequest body"
[ "$(inside stat -c '%a %U' /var/lib/exalsius-node-agent/state.json)" = "600 exalsius-agent" ] || die "state file mode"
[ "$(inside stat -c '%a' /var/lib/exalsius-node-agent)" = 700 ] || die "state dir mode"
ok "state file 0600 exalsius-agent in a 0700 directory"

say "reload"
pid=$(svc MainPID)
inside sed -i 's/^interval = "1s"/interval = "250ms"/' /etc/exalsius/node-agent.toml
before=$(requests)
inside systemctl reload exalsius-node-agent
sleep $((2 * TIME_SCALE))
[ "$(svc MainPID)" = "$pid" ] || die "reload changed the PID"
# The old 1 s interval gives 2 per 2 s, the new 250 ms one 8: at least 5 (per 2 s) tells them apart.
[ $(($(requests) - before)) -ge $((4 * TIME_SCALE + 1)) ] || die "new interval not in use: $(($(requests) - before)) requests in $((2 * TIME_SCALE)) s"
ok "systemctl reload: same PID $pid, new 250 ms interval in use"

say "SIGKILL"
inside kill -KILL "$pid"
for _ in $(seq $((150 * TIME_SCALE))); do
  new=$(svc MainPID); [ "$new" != 0 ] && [ "$new" != "$pid" ] && [ "$(svc ActiveState)" = active ] && break; sleep 0.1
done
[ "$new" != "$pid" ] && [ "$new" != 0 ] || die "not restarted after SIGKILL"
before=$(requests)
wait_requests $((before + 2)) 10
python3 - "$API_LOG" "$BOOT" "$before" <<'EOF' || die "restart did not use the persisted token"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
after = rows[int(sys.argv[3]):]
assert all(r["status"] == 200 for r in rows), [r for r in rows if r["status"] != 200]
assert after[0]["auth"] != "Bearer " + sys.argv[2], "fell back to the bootstrap token"
EOF
ok "SIGKILL: systemd restarted it (PID $pid → $new), it used the persisted token, no 401"

say "watchdog"
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nWatchdogSec=2s\n' | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/watchdog.conf'
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
pid=$(svc MainPID)
inside kill -STOP "$pid"
for _ in $(seq $((150 * TIME_SCALE))); do
  new=$(svc MainPID); [ "$new" != 0 ] && [ "$new" != "$pid" ] && break; sleep 0.1
done
[ "$new" != "$pid" ] || die "watchdog did not fire on a frozen loop"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal1.txt"
grep -q 'Watchdog timeout' "$WORK/journal1.txt" || die "no watchdog timeout in the journal"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/watchdog.conf
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
ok "watchdog: frozen loop (SIGSTOP) killed and restarted by systemd (PID $pid → $new)"

say "journal"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal.txt"
grep -q 'heartbeat ok' "$WORK/journal.txt" || die "no heartbeat lines in the journal"
if grep -q 'SECRET' "$WORK/journal.txt"; then die "a token is in the journal"; fi
ok "journalctl shows the agent's lines ($(wc -l <"$WORK/journal.txt") lines), no token in them"

if amd64_only "GPUs under the unit's device policy"; then
say "GPUs as the packaged service sees them: NVIDIA device nodes (major 195), a stub NVML and nvidia-smi that open them"
# The stub libnvidia-ml (tests/support/fake_nvml.c, open_devices=1) and nvidia-smi
# (tests/support/fake_nvidia_smi.c) open /dev/nvidiactl and /dev/nvidia<i> as the real ones do:
# refused (EPERM) by a device policy; ENXIO (no driver behind the node) counts as an answer.
cc -shared -fPIC -O1 -Wall -Werror -o "$WORK/libnvidia-ml.so.1" tests/support/fake_nvml.c
cc -O1 -Wall -Werror -o "$WORK/nvidia-smi" tests/support/fake_nvidia_smi.c
inside mkdir -p /opt/fake-nvidia
inside sh -c 'cat > /opt/fake-nvidia/libnvidia-ml.so.1' <"$WORK/libnvidia-ml.so.1"
inside sh -c 'cat > /usr/bin/nvidia-smi && chmod 755 /usr/bin/nvidia-smi' <"$WORK/nvidia-smi"
printf 'count=2\nopen_devices=1\n' | inside sh -c 'cat > /opt/fake-nvidia/fake_nvml.conf'
printf '\n[inventory]\ngpu = "auto"\nrefresh_interval = "2s"\nnvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"\n' \
  | inside bash -c 'cat >> /etc/exalsius/node-agent.toml'
nodes() { # create | remove: /dev/nvidiactl, /dev/nvidia0, /dev/nvidia1 as the driver makes them (0666)
  if [ "$1" = create ]; then
    inside sh -c 'mknod -m 666 /dev/nvidiactl c 195 255; mknod -m 666 /dev/nvidia0 c 195 0; mknod -m 666 /dev/nvidia1 c 195 1' 2>/dev/null || true
  else
    inside rm -f /dev/nvidiactl /dev/nvidia0 /dev/nvidia1
  fi
}
devices() { # 550 | 535 | none: the container's /proc/devices, as a driver of that generation lists major 195
  inside sh -c 'while grep -q " /proc/devices " /proc/self/mounts; do umount /proc/devices || break; done'
  local names
  case "$1" in
    550) names='195 nvidia\n195 nvidiactl\n508 nvidia-uvm\n509 nvidia-nvswitch\n510 nvidia-caps' ;;
    535) names='195 nvidia-frontend\n508 nvidia-uvm\n509 nvidia-nvswitch\n510 nvidia-caps' ;;
    none) return 0 ;;
  esac
  # Inside the "Character devices:" block: an empty line ends it for systemd's parser.
  printf "$names\n" | inside sh -c "cat > /run/nvidia-majors.$1"
  inside sh -c "awk -v f=/run/nvidia-majors.$1 '{print} /^Character devices:/{while ((getline l < f) > 0) print l}' /proc/devices >/run/devices.$1 && mount --bind /run/devices.$1 /proc/devices"
  inside grep -q '^195 nvidia' /proc/devices || die "fake /proc/devices ($1) not in place"
}
last_body() { # the newest heartbeat body's GPU fields and software.nvidia: "count|type|nvidia"
  python3 - "$API_LOG" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bodies = [r["body"] for r in rows if r.get("body")]
b = bodies[-1] if bodies else {"hardware": {"gpu_count": -1, "gpu_type": ""}, "software": {"nvidia": ""}}
print(f'{b["hardware"]["gpu_count"]}|{b["hardware"]["gpu_type"]}|{b["software"]["nvidia"]!r}')
EOF
}
gpu_check() { # LABEL EXPECT(2|0|any): restart, wait for 2 heartbeats, compare the newest body
  : >"$API_LOG"
  inside systemctl restart exalsius-node-agent
  wait_requests 2 15
  got=$(last_body)
  case "$2" in
    2) { [ "${got%%|*}" = 2 ] && grep -q '|H100 80GB HBM3|' <<<"$got" && ! grep -q "|''\$" <<<"$got"; } \
         || { inside journalctl -u exalsius-node-agent --no-pager | tail -15; die "$1: expected 2 GPUs and software.nvidia, got $got"; } ;;
    0) { [ "${got%%|*}" = 0 ] && grep -q "|''\$" <<<"$got"; } \
         || { inside journalctl -u exalsius-node-agent --no-pager | tail -15; die "$1: expected no GPUs, got $got"; } ;;
  esac
  echo "$1: gpu_count|gpu_type|software.nvidia = $got"
}
nodes create
devices 550
gpu_check "driver 550+ names (nvidia, nvidiactl), packaged unit" 2
ok "packaged unit, driver 550+ /proc/devices (nvidia, nvidiactl): NVML opens the nodes, the stub's 2 GPUs and software.nvidia are reported"
# bench/gpu-check.sh's run under the unit's sandbox, as it runs on a GPU machine: systemd-run with
# every sandboxing line of the installed unit (bench/gpu_check.py unit_sandbox), a dynamic user.
mapfile -t boxprops < <(python3 -c 'import sys; sys.path.insert(0, "bench"); import gpu_check; print("\n".join(gpu_check.unit_sandbox(sys.argv[1])))' systemd/exalsius-node-agent.service)
inside install -d -m 0755 /run/gpu-check
printf '[inventory]\nnvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"\n' | inside sh -c 'cat > /run/gpu-check/agent.toml && chmod 644 /run/gpu-check/agent.toml'
inside systemd-run --wait --pipe --collect --quiet -p DynamicUser=yes "${boxprops[@]}" \
  /usr/bin/exalsius-node-agent --config /run/gpu-check/agent.toml inventory --json --gpu nvml >"$WORK/boxed.json" 2>"$WORK/boxed.err" \
  || { cat "$WORK/boxed.err"; die "gpu-check's sandboxed run (systemd-run with the unit's properties)"; }
python3 -c 'import json,sys; h=json.load(open(sys.argv[1]))["hardware"]; assert h["gpu_count"] == 2, h' "$WORK/boxed.json" \
  || { cat "$WORK/boxed.json" "$WORK/boxed.err"; die "gpu-check's sandboxed run saw no GPUs"; }
ok "bench/gpu-check.sh's sandboxed run (systemd-run, $((${#boxprops[@]} / 2)) properties of the unit, DynamicUser): 2 GPUs through NVML"
devices 535
gpu_check "driver 535 names (nvidia-frontend), packaged unit" 2
ok "packaged unit, driver 535 /proc/devices (nvidia-frontend): the same 2 GPUs"
devices 550
inside sed -i 's|^nvml_library = .*|nvml_library = "/opt/fake-nvidia/absent.so"|' /etc/exalsius/node-agent.toml
gpu_check "no NVML library: nvidia-smi under the sandbox" any
grep -q "550.54.15" <<<"$got" || die "nvidia-smi under the packaged unit's sandbox gave no version: $got"
ok "packaged unit: nvidia-smi runs under the sandbox (SystemCallFilter, MemoryDenyWriteExecute, PrivateUsers) and opens the nodes: software.nvidia set"
inside sed -i 's|^nvml_library = .*|nvml_library = "/opt/fake-nvidia/libnvidia-ml.so.1"|' /etc/exalsius/node-agent.toml
# The unit as it was before this change (DeviceAllow=char-nvidia-frontend): it fails on 550+.
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nDeviceAllow=\nDeviceAllow=char-nvidia-frontend rw\nDeviceAllow=char-nvidia-uvm rw\nDeviceAllow=char-nvidia-caps r\nDeviceAllow=char-kfd rw\nDeviceAllow=char-drm rw\n' \
  | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/old-devices.conf'
inside systemctl daemon-reload
gpu_check "the previous unit (char-nvidia-frontend), driver 550+" 0
inside journalctl -u exalsius-node-agent --no-pager -n 60 >"$WORK/journal-old-unit.txt"
grep -q "device policy refuses it" "$WORK/journal-old-unit.txt" || { tail -20 "$WORK/journal-old-unit.txt"; die "no device-policy advice under the old unit"; }
ok "the previous unit fails the same check: no GPUs, no software.nvidia, and the warning names the device policy (not nvidia-persistenced)"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/old-devices.conf
inside systemctl daemon-reload
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart

say "a driver loaded after the service started: the agent has systemd start it again, once"
nodes remove
devices none
: >"$API_LOG"
inside systemctl start exalsius-node-agent
wait_requests 1 15
restarts=$(svc NRestarts)
[ "$(last_body | cut -d'|' -f1)" = 0 ] || die "GPUs before the driver was loaded?"
loaded=$(date +%s)
nodes create
devices 550
found=
for _ in $(seq $((300 * TIME_SCALE))); do
  [ "$(last_body | cut -d'|' -f1)" = 2 ] && { found=$(date +%s); break; }
  sleep 0.1
done
[ -n "$found" ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "GPUs not reported within 30 s of the driver appearing"; }
[ "$(svc NRestarts)" = $((restarts + 1)) ] || die "expected one restart, NRestarts $restarts → $(svc NRestarts)"
inside journalctl -u exalsius-node-agent --no-pager -n 80 >"$WORK/journal-late.txt"
grep -q "stopping so that systemd starts the service again" "$WORK/journal-late.txt" || die "no line saying why it restarted"
ok "driver loaded after start: GPUs reported $((found - loaded)) s after the nodes appeared (refresh 2 s + RestartSec 5 s), through exactly one restart by systemd"
inside systemctl stop exalsius-node-agent
inside rm -f /var/lib/exalsius-node-agent/device-policy-restart /usr/bin/nvidia-smi
nodes remove
devices none
inside sed -i '/^\[inventory\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl start exalsius-node-agent
fi

if amd64_only "metrics textfile"; then
say "metrics textfile under the hardened unit (docs/operator-guide.md \"Monitoring\")"
inside install -d -m 0755 /var/lib/prometheus/node-exporter
inside chown exalsius-agent /var/lib/prometheus/node-exporter
printf '\n[metrics]\ntextfile = "/var/lib/prometheus/node-exporter/exalsius_node_agent.prom"\n' \
  | inside bash -c 'cat >> /etc/exalsius/node-agent.toml'
inside systemctl restart exalsius-node-agent
before=$(requests)
wait_requests $((before + 3)) 10
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal-metrics.txt"
grep -q 'metrics: cannot write .*Read-only file system' "$WORK/journal-metrics.txt" \
  || { tail -20 "$WORK/journal-metrics.txt"; die "no warning about the read-only textfile directory"; }
[ "$(grep -c 'metrics: cannot write' "$WORK/journal-metrics.txt")" = 1 ] || die "the metrics warning repeats"
inside test ! -e /var/lib/prometheus/node-exporter/exalsius_node_agent.prom || die "wrote through ProtectSystem=strict?"
ok "without the drop-in: ProtectSystem=strict keeps the directory read-only, one warning, heartbeats go on"
inside mkdir -p /etc/systemd/system/exalsius-node-agent.service.d
printf '[Service]\nReadWritePaths=-/var/lib/prometheus/node-exporter\n' \
  | inside bash -c 'cat > /etc/systemd/system/exalsius-node-agent.service.d/metrics.conf'
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
# The container runs on an ephemeral snapshot (-x): read the file from inside.
prom=$WORK/exalsius_node_agent.prom
for _ in $(seq 100); do
  inside cat /var/lib/prometheus/node-exporter/exalsius_node_agent.prom >"$prom" 2>/dev/null && [ -s "$prom" ] && break
  sleep 0.1
done
[ -s "$prom" ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "no metrics file with the drop-in"; }
[ "$(inside stat -c '%a %U' /var/lib/prometheus/node-exporter/exalsius_node_agent.prom)" = "644 exalsius-agent" ] || die "metrics file mode"
/usr/bin/python3 - "$prom" <<'EOF' || die "metrics file does not parse"
import sys
from prometheus_client.parser import text_string_to_metric_families
samples = {s.name: s.value for f in text_string_to_metric_families(open(sys.argv[1]).read()) for s in f.samples}
assert samples["exalsius_node_agent_last_http_status"] == 200, samples
assert samples["exalsius_node_agent_last_success_timestamp_seconds"] > 0, samples
EOF
if [ -n "${EXALSIUS_PROMTOOL:-}" ]; then
  "$EXALSIUS_PROMTOOL" check metrics <"$prom" || die "promtool check metrics"
fi
ok "with the operator's guide's drop-in (ReadWritePaths=): the service writes the textfile, 0644, parsed by prometheus_client"
inside rm -f /etc/systemd/system/exalsius-node-agent.service.d/metrics.conf
inside sed -i '/^\[metrics\]/,$d' /etc/exalsius/node-agent.toml
inside systemctl daemon-reload
inside systemctl restart exalsius-node-agent
fi

if amd64_only "upgrade"; then
say "upgrade"
pid=$(svc MainPID)
token_before=$(inside python3 -c 'import json; print(json.load(open("/var/lib/exalsius-node-agent/state.json"))["access_token"])' 2>/dev/null \
  || inside sed -n 's/.*"access_token": "\(.*\)".*/\1/p' /var/lib/exalsius-node-agent/state.json)
inside apt-get install -y -q /mnt/pkg/upgrade/"$(basename "$DEB2")" >"$WORK/apt2.log" 2>&1 || { cat "$WORK/apt2.log"; die "upgrade"; }
[ "$(inside dpkg-query -W -f '${Version}' exalsius-node-agent)" = "$(basename "$DEB2" | sed 's/.*_\(.*\)_amd64.deb/\1/')" ] || die "version"
inside grep -q "127.0.0.1:$port" /etc/exalsius/node-agent.toml || die "upgrade replaced the edited config"
for _ in $(seq 100); do new=$(svc MainPID); [ "$new" != "$pid" ] && [ "$new" != 0 ] && break; sleep 0.1; done
[ "$new" != "$pid" ] || die "not restarted on upgrade"
[ -n "$token_before" ] || die "no token in the state before the upgrade"
before=$(requests)
wait_requests $((before + 2)) 10
python3 - "$API_LOG" <<'EOF' || die "401 after upgrade"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert all(r["status"] == 200 for r in rows)
EOF
ok "upgrade to -2: config kept, state kept (no 401), service restarted (PID $pid → $new)"
fi

say "purge"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt3.log" 2>&1 || { cat "$WORK/apt3.log"; die "purge"; }
inside test ! -e /var/lib/exalsius-node-agent || die "state dir survived purge"
inside test ! -e /etc/exalsius/node-agent.toml || die "config survived purge"
inside test ! -e /lib/systemd/system/exalsius-node-agent.service || die "unit survived purge"
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "still running after purge"
ok "apt-get purge: state, config and unit gone, service stopped"

if amd64_only "client-hw-info takeover and the .rpm"; then
say "take over from client-hw-info on install (import-legacy in the postinst)"
# The old tool as it left machines: a root timer every 15 minutes, its one-shot service, and
# root's config.env with the latest rotated token (the stand-in accepts only that one). The
# fake binary records each run that found credentials.
inside bash -c 'cat > /usr/local/bin/client-hw-info' <<'EOF'
#!/bin/sh
[ -f /root/.config/exalsius/config.env ] || { echo "client-hw-info: no credentials" >&2; exit 1; }
date +%s >>/var/log/client-hw-info.runs
EOF
inside chmod 755 /usr/local/bin/client-hw-info
inside bash -c 'cat > /etc/systemd/system/client-hw-info.service' <<'EOF'
[Unit]
Description=client-hw-info (legacy)
[Service]
Type=oneshot
ExecStart=/usr/local/bin/client-hw-info
EOF
inside bash -c 'cat > /etc/systemd/system/client-hw-info.timer' <<'EOF'
[Unit]
Description=client-hw-info every 15 minutes (legacy)
[Timer]
OnBootSec=1min
OnUnitActiveSec=15min
[Install]
WantedBy=timers.target
EOF
inside mkdir -p /root/.config/exalsius
inside bash -c 'cat > /root/.config/exalsius/config.env' <<EOF
# written by client-hw-info
NODE_ID="$LEGACY_NODE"
API_URL="http://127.0.0.1:$port/v1"
AUTH_TOKEN="$LEGACY_TOKEN"
EOF
inside systemctl daemon-reload
inside systemctl enable --now client-hw-info.timer >/dev/null 2>&1
inside systemctl start client-hw-info.service
inside test -s /var/log/client-hw-info.runs || die "the fake legacy tool did not run"
[ "$(inside systemctl is-active client-hw-info.timer)" = active ] || die "legacy timer not active"
# The operator's config management put the agent's config in place first (api.url only).
operator_config() {
  inside mkdir -p /etc/exalsius
  inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"

[heartbeat]
interval = "1s"
jitter = 0.0
EOF
}
operator_config
# First with `systemctl disable` failing after `stop` worked (a read-only timers.target.wants):
# the import must start the legacy timer again, change nothing, and the postinst say so.
inside mount --bind /etc/systemd/system/timers.target.wants /etc/systemd/system/timers.target.wants
inside mount -o remount,ro,bind /etc/systemd/system/timers.target.wants
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy-fail.log" 2>&1 \
  || { cat "$WORK/apt-legacy-fail.log"; die "apt-get install with a failing disable"; }
inside umount /etc/systemd/system/timers.target.wants
grep -q "is enabled and running again" "$WORK/apt-legacy-fail.log" || { cat "$WORK/apt-legacy-fail.log"; die "import-legacy did not say it restarted the legacy timer"; }
grep -q "client-hw-info keeps running (its timer is active)" "$WORK/apt-legacy-fail.log" || { cat "$WORK/apt-legacy-fail.log"; die "the postinst did not say client-hw-info keeps running"; }
[ "$(inside systemctl is-active client-hw-info.timer || true)" = active ] || die "legacy timer left stopped after a failed import"
inside test -f /root/.config/exalsius/config.env || die "config.env renamed although nothing was imported"
inside test ! -e /var/lib/exalsius-node-agent/state.json || die "state written although the import failed"
inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge after the failed import"
operator_config
ok "a failed disable after a working stop: the legacy timer runs again, nothing imported, and the postinst says so"
: >"$API_LOG"
inside apt-get install -y -q -o Dpkg::Options::=--force-confold /mnt/pkg/"$(basename "$DEB")" >"$WORK/apt-legacy.log" 2>&1 \
  || { cat "$WORK/apt-legacy.log"; die "apt-get install over client-hw-info"; }
grep -q 'taking over its node' "$WORK/apt-legacy.log" || { cat "$WORK/apt-legacy.log"; die "the postinst did not run import-legacy"; }
grep -q "imported node $LEGACY_NODE" "$WORK/apt-legacy.log" || { cat "$WORK/apt-legacy.log"; die "import-legacy did not import"; }
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
for _ in $(seq 100); do [ "$(requests)" -ge 2 ] && break; sleep 0.1; done
python3 - "$API_LOG" "$LEGACY_NODE" "$LEGACY_TOKEN" <<'EOF' || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "first heartbeats after the takeover"; }
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
beats = [r for r in rows if r["node"] == sys.argv[2]]
assert len(beats) >= 2, rows
assert beats[0]["auth"] == "Bearer " + sys.argv[3] and beats[0]["status"] == 200, beats[0]
assert beats[1]["auth"] != beats[0]["auth"] and beats[1]["status"] == 200, beats[1]
assert all(r["status"] == 200 for r in rows), rows
EOF
ok "the service started with the imported node: the first heartbeat carried the legacy token, the next a rotated one"
inside apt-get purge -y -q exalsius-node-agent >"$WORK/apt4.log" 2>&1 || { cat "$WORK/apt4.log"; die "purge"; }
inside rm -rf /etc/systemd/system/client-hw-info.service /etc/systemd/system/client-hw-info.timer /root/.config/exalsius
inside systemctl daemon-reload

say "the .rpm in the same booted container"
inside userdel exalsius-agent 2>/dev/null || true
inside rpm -i --nodeps /mnt/pkg/"$(basename "$RPM")" >"$WORK/rpm.log" 2>&1 || { cat "$WORK/rpm.log"; die "rpm -i"; }
inside getent passwd exalsius-agent >/dev/null || die "%pre did not create the user"
[ "$(inside stat -c '%a %U:%G' /etc/exalsius/node-agent.toml)" = "640 root:exalsius-agent" ] || die "rpm config mode"
[ "$(inside systemctl is-enabled exalsius-node-agent)" = enabled ] || die "%post did not enable the unit"
wait_prop ExecMainStatus 78 10
ok "rpm -i: %pre created the user, %post enabled and started the unit (unconfigured → 78)"
configure 1s
before=$(requests)
inside systemctl restart exalsius-node-agent
wait_requests $((before + 2)) 10
ok "rpm-installed agent heartbeats after configuration"
inside rpm -e exalsius-node-agent >"$WORK/rpm-e.log" 2>&1 || { cat "$WORK/rpm-e.log"; die "rpm -e"; }
[ "$(inside systemctl is-active exalsius-node-agent || true)" != active ] || die "%preun did not stop it"
inside test -f /var/lib/exalsius-node-agent/state.json || die "rpm -e removed the state"
ok "rpm -e: %preun stopped and disabled; the state (token) is kept, as Debian's remove keeps it"
fi

if amd64_only "the signed apt repository: install, upgrade and rollback"; then
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
installed() { inside dpkg-query -W -f '${db:Status-Status} ${Version}' exalsius-node-agent 2>/dev/null || true; }
for v in wrongkey unsigned; do
  apt_source "$v"
  inside apt-get update >"$WORK/update-$v.log" 2>&1 || true
  case "$v" in
    wrongkey) grep -qE 'NO_PUBKEY|signatures (couldn.t be verified|were invalid)' "$WORK/update-$v.log" ;;
    unsigned) grep -q 'is not signed' "$WORK/update-$v.log" ;;
  esac || { cat "$WORK/update-$v.log"; die "apt-get update did not name the $v repository's signature problem"; }
  if inside apt-get install -y -q exalsius-node-agent >"$WORK/install-$v.log" 2>&1; then
    cat "$WORK/install-$v.log"; die "apt-get installed from the $v repository"
  fi
  case "$(installed)" in installed*) die "installed from the $v repository" ;; esac
done
ok "a repository signed by another key (NO_PUBKEY) and an unsigned one: apt-get update refuses them, nothing installed"
apt_source tampered
inside apt-get update >"$WORK/update-tampered.log" 2>&1 || { cat "$WORK/update-tampered.log"; die "apt-get update (tampered package)"; }
if inside apt-get install -y -q exalsius-node-agent >"$WORK/install-tampered.log" 2>&1; then
  cat "$WORK/install-tampered.log"; die "apt-get installed a package changed after signing"
fi
grep -qE 'Hash Sum mismatch|Hashes of expected file' "$WORK/install-tampered.log" \
  || { cat "$WORK/install-tampered.log"; die "apt-get refused the changed package without naming the hash"; }
case "$(installed)" in installed*) die "the changed package got installed" ;; esac
ok "a package changed after signing: apt-get install refuses it (hash mismatch), nothing installed"

apt_source good
inside apt-get update >"$WORK/update-good.log" 2>&1 || { cat "$WORK/update-good.log"; die "apt-get update (good repository)"; }
if grep -qE '^(W|E):' "$WORK/update-good.log"; then cat "$WORK/update-good.log"; die "apt-get update warned about the good repository"; fi
CUR_VERSION=$(dpkg-deb -f "$DEB" Version)
inside apt-cache madison exalsius-node-agent >"$WORK/madison.txt"
grep -q "$PREV_VERSION-1" "$WORK/madison.txt" && grep -q "$CUR_VERSION" "$WORK/madison.txt" \
  || { cat "$WORK/madison.txt"; die "apt does not offer both $PREV_VERSION-1 and $CUR_VERSION"; }
ok "apt-get update: the repository verifies against its keyring (signed-by=); $PREV_VERSION-1 and $CUR_VERSION offered"

FLEET_NODE=7c1d2e3f-4a5b-4c6d-8e7f-9a0b1c2d3e4f
FLEET_TOKEN=fleet-SECRET-token-5
FLEET_MARKS=
fleet_rows() { python3 -c 'import json,sys; print(sum(1 for l in open(sys.argv[1]) if json.loads(l).get("node") == sys.argv[2]))' "$API_LOG" "$FLEET_NODE"; }
fleet_chain() { # every heartbeat of FLEET_NODE answered 200, each with the token the answer before it issued
  python3 - "$API_LOG" "$FLEET_NODE" "$FLEET_TOKEN" "$FLEET_MARKS" <<'EOF'
import json, sys
log, node, boot, marks = sys.argv[1], sys.argv[2], sys.argv[3], {int(m) for m in sys.argv[4].split()}
rows = [r for r in map(json.loads, open(log)) if r.get("node") == node]
bad = [i for i, r in enumerate(rows) if r["status"] != 200]
assert rows and not bad, f"heartbeats {bad} of {len(rows)} were not answered 200"
assert rows[0]["auth"] == "Bearer " + boot, "the first heartbeat did not carry the configured token"
for i in range(1, len(rows)):
    want = ["Bearer " + rows[i - 1]["issued"]]
    if i in marks:
        # The first heartbeat of a new process: the last answer of the old one may have been cut
        # off by the stop (SIGTERM ends a heartbeat in flight); then the token before it.
        want.append("Bearer " + (rows[i - 2]["issued"] if i >= 2 else boot))
    assert rows[i]["auth"] in want, f"heartbeat {i} carried neither the last rotated token nor (after a restart) the one before"
print(len(rows))
EOF
}
fleet_step() { # LABEL VERSION: the agent of VERSION runs, heartbeats rotate with the last token, status says so
  local before n
  before=$(fleet_rows)
  for _ in $(seq $((150 * TIME_SCALE))); do [ "$(fleet_rows)" -ge $((before + 3)) ] && break; sleep 0.1; done
  [ "$(fleet_rows)" -ge $((before + 3)) ] || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "$1: no heartbeats"; }
  n=$(fleet_chain) || { inside journalctl -u exalsius-node-agent --no-pager | tail -20; die "$1: the token chain broke"; }
  [ "$(installed)" = "installed $2" ] || die "$1: dpkg says $(installed), expected $2"
  inside exalsius-node-agent --version | grep -q " ${2%-*}\$" || die "$1: the binary is not ${2%-*}"
  inside exalsius-node-agent status --json >"$WORK/status.json" || { cat "$WORK/status.json"; die "$1: status unhealthy"; }
  python3 - "$WORK/status.json" "$FLEET_NODE" <<'EOF' || die "$1: status"
import json, sys
s = json.load(open(sys.argv[1]))
assert s["node_id"] == sys.argv[2] and s["healthy"] and s["last_result"] == "ok", s
EOF
  echo "$1: $n heartbeats of the fleet node so far, each with the last rotated token"
}

inside apt-get install -y -q exalsius-node-agent="$PREV_VERSION-1" >"$WORK/apt-prev.log" 2>&1 \
  || { cat "$WORK/apt-prev.log"; die "apt-get install exalsius-node-agent=$PREV_VERSION-1"; }
inside bash -c "cat > /etc/exalsius/node-agent.toml" <<EOF
[api]
url = "http://127.0.0.1:$port/v1"
node_id = "$FLEET_NODE"
access_token = "$FLEET_TOKEN"

[heartbeat]
interval = "1s"
jitter = 0.0
EOF
inside systemctl restart exalsius-node-agent
fleet_step "installed $PREV_VERSION-1 from the repository" "$PREV_VERSION-1"
if inside grep -q '"format"' /var/lib/exalsius-node-agent/state.json; then die "$PREV_VERSION wrote a format number?"; fi
ok "apt-get install exalsius-node-agent=$PREV_VERSION-1 from the repository: heartbeats rotate the token, status healthy"

pid=$(svc MainPID)
FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
inside apt-get upgrade -y -q >"$WORK/apt-upgrade.log" 2>&1 || { cat "$WORK/apt-upgrade.log"; die "apt-get upgrade"; }
[ "$(svc MainPID)" != "$pid" ] || die "apt-get upgrade did not restart the service"
fleet_step "apt-get upgrade to $CUR_VERSION while it ran" "$CUR_VERSION"
inside grep -q '"format": 1' /var/lib/exalsius-node-agent/state.json || die "$CUR_VERSION did not write state format 1"
inside grep -q "$FLEET_NODE" /etc/exalsius/node-agent.toml || die "the upgrade replaced the operator's config"
ok "apt-get upgrade $PREV_VERSION-1 → $CUR_VERSION while running: restarted, the next heartbeat carried the last rotated token, config kept, state now format 1"

pid=$(svc MainPID)
FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
inside apt-get install -y -q --allow-downgrades exalsius-node-agent="$PREV_VERSION-1" >"$WORK/apt-rollback.log" 2>&1 \
  || { cat "$WORK/apt-rollback.log"; die "rollback"; }
[ "$(svc MainPID)" != "$pid" ] || die "the rollback did not restart the service"
fleet_step "rollback to $PREV_VERSION-1" "$PREV_VERSION-1"
ok "rollback (apt-get install exalsius-node-agent=$PREV_VERSION-1 --allow-downgrades): $PREV_VERSION reads the format-1 state, heartbeats with the last rotated token, status healthy"

pid=$(svc MainPID)
FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
inside apt-get install -y -q exalsius-node-agent >"$WORK/apt-again.log" 2>&1 || { cat "$WORK/apt-again.log"; die "upgrade after the rollback"; }
[ "$(svc MainPID)" != "$pid" ] || die "the second upgrade did not restart the service"
fleet_step "upgrade again after the rollback" "$CUR_VERSION"
ok "upgrade again to $CUR_VERSION after the rollback: the token chain holds ($(fleet_rows) heartbeats, every one 200)"
# The next rollback, as this version will see it: a state written by a newer format, with a
# field this version does not know.
inside systemctl stop exalsius-node-agent
inside sed -i 's/"format": 1/"format": 2, "rollout_wave": {"wave": 3}/' /var/lib/exalsius-node-agent/state.json
FLEET_MARKS="$FLEET_MARKS $(fleet_rows)"
inside systemctl start exalsius-node-agent
fleet_step "a state from a newer format" "$CUR_VERSION"
inside journalctl -u exalsius-node-agent --no-pager -n 40 | grep -q 'has format 2, newer than this version' \
  || die "no line saying the state is from a newer version"
inside grep -q '"format": 2' /var/lib/exalsius-node-agent/state.json || die "the newer format number was lowered"
inside grep -q '"rollout_wave"' /var/lib/exalsius-node-agent/state.json || die "a newer version's field was dropped"
ok "a state from a newer format (2, an unknown field): used with a warning, heartbeats go on with its token, saved back with format 2 and the field"
inside journalctl -u exalsius-node-agent --no-pager >"$WORK/journal-fleet.txt"
if grep -q SECRET "$WORK/journal-fleet.txt" "$WORK"/apt-{prev,upgrade,rollback,again}.log; then die "a token in the journal or apt's output"; fi
inside apt-get purge -y -q exalsius-node-agent >/dev/null 2>&1 || die "purge after the fleet test"
fi

say "done: $checks checks passed ($ARCH)"
