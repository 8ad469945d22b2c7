# about: packaging/repo.sh: the signed apt and yum repositories (this build and the previous release), what it refuses, and badly signed copies for the later phases
# needs: packages
# arm64: skip the signed repositories (architecture-independent, proven by the x86-64 run)
say "the previous release and the signed repositories (packaging/repo.sh)"
previous_release
# Throw-away keys: the repository's and another one (the "wrongly signed" repository).
keys() { # NAME: a GnuPG home $WORK/NAME with one unprotected signing key, exported to $WORK/NAME.sec
  install -d -m 700 "$WORK/$1"
  GNUPGHOME=$WORK/$1 gpg --batch --quiet --passphrase '' --quick-gen-key "exalsius $1 test key <$1@invalid>" rsa3072 sign 1d
  GNUPGHOME=$WORK/$1 gpg --batch --quiet --export-secret-keys >"$WORK/$1.sec"
}
keys good
keys other
rm -rf "$REPOS"
mkdir -p "$REPOS"
bash packaging/repo.sh --key-file "$WORK/good.sec" --url "file:///mnt/pkg/repos/good" "$REPOS/good" \
  "$PREV_DEB" "$PREV_RPM" "$PKG"/*.deb "$PKG"/*.rpm >"$WORK/repo.log" 2>&1 || { show "$WORK/repo.log"; die "repo.sh"; }
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
  grep -q "$want" "$WORK/refused.log" || { show "$WORK/refused.log"; die "repo.sh $*: expected '$want'"; }
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
  || { show "$WORK/again.log"; die "repo.sh with packages already there"; }
cmp -s "$WORK/Packages.before" "$REPOS/good/apt/dists/stable/main/binary-amd64/Packages" || die "re-adding the same build changed the apt index"
diff <(grep -v '<revision>\|<timestamp>' "$WORK/repomd.before") <(grep -v '<revision>\|<timestamp>' "$REPOS/good/rpm/x86_64/repodata/repomd.xml") >/dev/null \
  || die "re-adding the same build changed the yum metadata (re-signed the .rpm?)"
cp "$DEB" "$WORK/rebuilt.deb"
tamper "$WORK/rebuilt.deb"
cp "$REPOS/good/apt/dists/stable/InRelease" "$WORK/InRelease.before"
bash packaging/repo.sh --key-file "$WORK/good.sec" "$REPOS/good" "$WORK/rebuilt.deb" >"$WORK/rebuilt.log" 2>&1 \
  && die "repo.sh published another build under a version already there"
grep -q "is another build under the same version" "$WORK/rebuilt.log" || { show "$WORK/rebuilt.log"; die "repo.sh did not say why"; }
cmp -s "$WORK/InRelease.before" "$REPOS/good/apt/dists/stable/InRelease" || die "the refused run changed the repository"
cmp -s "$DEB" "$REPOS/good/apt/pool/main/$(basename "$DEB")" || die "the refused run replaced the published package"
# Two release jobs at once on one directory: the second is refused, not interleaved.
flock -o "$REPOS/good" sleep 60 &
holder=$!
for _ in $(seq 50); do flock -n "$REPOS/good" true || break; sleep 0.1; done
bash packaging/repo.sh --key-file "$WORK/good.sec" "$REPOS/good" "$DEB" >"$WORK/locked.log" 2>&1 \
  && { kill "$holder"; die "repo.sh ran while another held the repository"; }
kill "$holder"; wait "$holder" 2>/dev/null || true
grep -q "another repo.sh is updating" "$WORK/locked.log" || { show "$WORK/locked.log"; die "repo.sh did not say another one is running"; }
cmp -s "$WORK/InRelease.before" "$REPOS/good/apt/dists/stable/InRelease" || die "the locked-out run changed the repository"
ok "repo.sh again with the same build: the apt index and the yum metadata unchanged (the .rpm not signed twice); another build under a published version (another file name): refused, the repository untouched; a second repo.sh while one runs: refused"

# The badly signed variants apt and dnf must refuse (the rpm-signatures and fleet phases): signed
# by another key, not signed, and a package changed after signing.
cp -a "$REPOS/good" "$REPOS/wrongkey"
(export GNUPGHOME=$WORK/other
 gpg --batch --yes --quiet --clearsign -o "$REPOS/wrongkey/apt/dists/stable/InRelease" "$REPOS/wrongkey/apt/dists/stable/Release"
 gpg --batch --yes --quiet --detach-sign --armor -o "$REPOS/wrongkey/apt/dists/stable/Release.gpg" "$REPOS/wrongkey/apt/dists/stable/Release"
 gpg --batch --yes --quiet --detach-sign --armor -o "$REPOS/wrongkey/rpm/x86_64/repodata/repomd.xml.asc" "$REPOS/wrongkey/rpm/x86_64/repodata/repomd.xml")
cp -a "$REPOS/good" "$REPOS/unsigned"
rm "$REPOS/unsigned/apt/dists/stable/InRelease" "$REPOS/unsigned/apt/dists/stable/Release.gpg"
cp -a "$REPOS/good" "$REPOS/tampered"
for d in "$REPOS/tampered/apt/pool/main/$(basename "$DEB")" "$REPOS"/tampered/rpm/x86_64/*-1.x86_64.rpm; do
  tamper "$d"
done
