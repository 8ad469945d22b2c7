# about: static checks of the packages: lintian, rpmlint, glibc ceiling, size, .text.hot, audit data, dependencies, conffiles, shipped files, scriptlets, systemd-analyze security
# needs: packages
# arm64: skip the static checks (packaging/test-arm64.sh does them for the arm64 packages)
say "static checks"
. packaging/checks.sh
lint_packages amd64 "$DEB" "$RPM"
glibc_ceiling amd64 target/assets/exalsius-node-agent
size_ceiling amd64 target/assets/exalsius-node-agent
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
