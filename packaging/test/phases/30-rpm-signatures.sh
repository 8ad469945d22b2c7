# about: the RPM side of the repository: rpm -K against the exported key, dnf against the signed repodata
# needs: repos
# arm64: skip the signed yum repository (architecture-independent, proven by the x86-64 run)
say "the RPM side: rpm -K against the exported key, dnf against the signed repodata"
rpmdb=$WORK/rpmdb
mkdir -p "$rpmdb"
for r in "$REPOS"/good/rpm/*/*.rpm; do
  rpm --dbpath "$rpmdb" -K "$r" >"$WORK/rpmk.txt" 2>&1 && die "rpm -K passed $(basename "$r") before the key was imported"
done
rpm --dbpath "$rpmdb" --import "$REPOS/good/RPM-GPG-KEY-exalsius"
for r in "$REPOS"/good/rpm/*/*.rpm; do
  rpm --dbpath "$rpmdb" -Kv "$r" >"$WORK/rpmk.txt" 2>&1 || { show "$WORK/rpmk.txt"; die "rpm -K $(basename "$r")"; }
  grep -q 'Signature, key ID .*: OK' "$WORK/rpmk.txt" || { show "$WORK/rpmk.txt"; die "$(basename "$r") carries no signature rpm checked"; }
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
dnf_repo good >"$WORK/dnf.out" 2>"$WORK/dnf.err" || { show "$WORK/dnf.err"; die "dnf repoquery (good repository)"; }
grep -qx "$(rpm -qp --qf '%{VERSION}-%{RELEASE}' "$RPM" 2>/dev/null)" "$WORK/dnf.out" && grep -qx "$PREV_VERSION-1" "$WORK/dnf.out" \
  || { cat "$WORK/dnf.out" "$WORK/dnf.err"; die "dnf does not offer both versions from the signed repository"; }
# dnf's repoquery exits 0 when it ignores a repository: what it printed decides.
dnf_repo wrongkey >"$WORK/dnf-wrong.out" 2>"$WORK/dnf-wrong.err" || true
if grep -q '^[0-9]' "$WORK/dnf-wrong.out" || ! grep -q 'GPG signature verification error' "$WORK/dnf-wrong.err"; then
  cat "$WORK/dnf-wrong.out" "$WORK/dnf-wrong.err"; die "dnf used repodata signed by another key, or did not say why it refused it"
fi
ok "dnf (repo_gpgcheck=1): reads the repodata signed by the repository's key ($PREV_VERSION-1 and this build offered); refuses it signed by another key"
