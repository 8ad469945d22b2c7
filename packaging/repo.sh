#!/usr/bin/env bash
# Adds built packages to a signed apt and yum/dnf repository in a directory that any static web
# server can publish (docs/operator-guide.md "Installing on a fleet"):
#
#   bash packaging/repo.sh (--key-file FILE | --gnupghome DIR) [--key ID] [--url URL] REPO PACKAGE...
#
#   --key-file FILE  the signing key, an exported OpenPGP secret key (gpg --export-secret-keys);
#                    imported into a throw-away GnuPG home that is removed afterwards.
#   --gnupghome DIR  or sign with a key already in this GnuPG home (its keys are not changed).
#   --key ID         which secret key (fingerprint, id or e-mail); default: the only one there.
#   --url URL        where REPO will be published; writes exalsius.sources and exalsius.repo
#                    with it (the files an operator copies to each host).
#   REPO             created if absent. Packages already in it stay, so a fleet can roll back
#                    with apt-get install exalsius-node-agent=<older version> / dnf downgrade;
#                    one already there under the same name must be the same build (refused
#                    otherwise). Build it locally and publish a copy (rsync --delay-updates).
#   PACKAGE          .deb and .rpm files (both architectures), e.g. target/packages/*.{deb,rpm}.
#
# REPO afterwards:
#   apt/pool/main/*.deb                       the .debs as built (their bytes are not changed)
#   apt/dists/stable/{InRelease,Release,Release.gpg}
#   apt/dists/stable/main/binary-{amd64,arm64}/Packages{,.gz}
#   rpm/{x86_64,aarch64}/*.rpm                the .rpms, signed (rpmsign --addsign)
#   rpm/{x86_64,aarch64}/repodata/            createrepo_c, with repomd.xml.asc
#   exalsius-archive-keyring.gpg              the public key, binary (apt's signed-by=)
#   RPM-GPG-KEY-exalsius                      the public key, armored (dnf's gpgkey=, rpm --import)
# Only the public half is written into REPO. The packages are copied; the build output is left
# as it is (packaging/test-reproducible.sh compares it).
set -euo pipefail

usage() { sed -n '5,18p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
die() { echo "repo.sh: $*" >&2; exit 1; }

key_file= home= key_id= url=
while [ $# -gt 0 ]; do
  case "$1" in
    --key-file) [ $# -ge 2 ] || usage; key_file=$2; shift 2 ;;
    --gnupghome) [ $# -ge 2 ] || usage; home=$2; shift 2 ;;
    --key) [ $# -ge 2 ] || usage; key_id=$2; shift 2 ;;
    --url) [ $# -ge 2 ] || usage; url=${2%/}; shift 2 ;;
    -h | --help) usage ;;
    --*) echo "repo.sh: unknown option $1" >&2; usage ;;
    *) break ;;
  esac
done
[ $# -ge 2 ] || usage
repo=$1
shift
if [ -n "$key_file" ] && [ -n "$home" ]; then die "give --key-file or --gnupghome, not both"; fi
[ -n "$key_file" ] || [ -n "$home" ] || die "no signing key: give --key-file FILE or --gnupghome DIR"
for p in "$@"; do
  [ -f "$p" ] || die "$p: no such file"
  case "$p" in *.deb | *.rpm) ;; *) die "$p: neither a .deb nor an .rpm" ;; esac
done

missing=()
for tool in apt-ftparchive:apt-utils createrepo_c:createrepo-c gpg:gnupg rpmsign:rpm dpkg-deb:dpkg; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [ -n "$key_file" ]; then
  [ -r "$key_file" ] || die "$key_file: cannot read the signing key"
  home=$tmp/gnupg
  install -d -m 700 "$home"
  gpg --homedir "$home" --batch --quiet --import "$key_file" 2>"$tmp/import.err" \
    || { cat "$tmp/import.err" >&2; die "$key_file: not an OpenPGP key gpg can import"; }
fi
[ -d "$home" ] || die "$home: no such GnuPG home"
export GNUPGHOME=$home
# The secret key to sign with: the one named, or the only one present.
mapfile -t secret < <(gpg --batch --with-colons --list-secret-keys ${key_id:+"$key_id"} 2>/dev/null \
  | awk -F: '$1 == "sec" { want = 1 } $1 == "fpr" && want { print $10; want = 0 }')
case "${#secret[@]}" in
  0) die "no secret key${key_id:+ matching $key_id} in ${key_file:-$home}" ;;
  1) fpr=${secret[0]} ;;
  *) die "${#secret[@]} secret keys in ${key_file:-$home}: choose one with --key (${secret[*]})" ;;
esac
gpg_sign() { gpg --batch --yes --quiet --pinentry-mode loopback --passphrase-fd 3 --local-user "$fpr" "$@" 3</dev/null; }
# A key that needs a passphrase cannot sign unattended: say so before anything is changed.
echo probe | gpg_sign --detach-sign -o "$tmp/probe.sig" 2>"$tmp/probe.err" \
  || { cat "$tmp/probe.err" >&2; die "key $fpr cannot sign without a passphrase (give a key for unattended signing)"; }

mkdir -p "$repo"
# One writer at a time: a second repo.sh on the same directory would interleave the indices.
exec 9<"$repo"
flock -n 9 || die "another repo.sh is updating $repo"
# A package already published under the same name and version must be the same build: hosts that
# installed the first would never get the second, and caches would disagree with the index.
# (.rpm: the header digest, which the signature added in the repository does not change.)
rpm_header() { rpm -qp --qf '%{SHA256HEADER}' "$1" 2>/dev/null; }
# Where each package goes, named by what it is (name, version, architecture), not by the name
# of the file it came in.
dest=()
for p in "$@"; do
  case "$p" in
    *.deb)
      fields=()
      for f in Package Version Architecture; do
        v=$(dpkg-deb -f "$p" "$f" 2>/dev/null) && [ -n "$v" ] || die "$p: dpkg-deb cannot read its $f"
        fields+=("$v")
      done
      # As Debian names pool files: no epoch.
      d=$repo/apt/pool/main/${fields[0]}_${fields[1]#*:}_${fields[2]}.deb
      [ ! -e "$d" ] || cmp -s "$p" "$d" \
        || die "$d is another build under the same version: build this one with another DEB_REVISION"
      ;;
    *.rpm)
      name=$(rpm -qp --qf '%{NAME}-%{VERSION}-%{RELEASE}.%{ARCH}' "$p" 2>/dev/null) || die "$p: rpm cannot read it"
      d=$repo/rpm/${name##*.}/$name.rpm
      [ ! -e "$d" ] || [ "$(rpm_header "$p")" = "$(rpm_header "$d")" ] \
        || die "$d is another build under the same version: build this one with another DEB_REVISION"
      ;;
  esac
  dest+=("$d")
done

i=0
for p in "$@"; do
  d=${dest[$i]}
  i=$((i + 1))
  # Already there (the same build, checked above): copied and signed once, never again.
  [ ! -e "$d" ] || continue
  mkdir -p "$(dirname "$d")"
  part=$(dirname "$d")/.$(basename "$d").part
  cp "$p" "$part"
  case "$p" in
    *.rpm)
      rpmsign --addsign --define "_gpg_name $fpr" --define "_gpg_path $home" --define "__gpg $(command -v gpg)" \
        "$part" >"$tmp/rpmsign.log" 2>&1 || { rm -f "$part"; cat "$tmp/rpmsign.log" >&2; die "rpmsign $(basename "$p")"; }
      ;;
  esac
  mv "$part" "$d"
done

# apt: one Packages index per architecture over the whole pool, a Release with their hashes,
# signed inline (InRelease) and detached (Release.gpg, for older apt).
(
  cd "$repo/apt"
  archs=$(for d in pool/main/*.deb; do [ -e "$d" ] && dpkg-deb -f "$d" Architecture; done | sort -u | tr '\n' ' ')
  archs=${archs% }
  [ -n "$archs" ] || exit 0
  rm -rf dists/stable
  for a in $archs; do
    mkdir -p "dists/stable/main/binary-$a"
    apt-ftparchive --arch "$a" packages pool/main >"dists/stable/main/binary-$a/Packages"
    gzip -9n -c "dists/stable/main/binary-$a/Packages" >"dists/stable/main/binary-$a/Packages.gz"
  done
  apt-ftparchive \
    -o APT::FTPArchive::Release::Origin=exalsius \
    -o APT::FTPArchive::Release::Label=exalsius-node-agent \
    -o APT::FTPArchive::Release::Suite=stable \
    -o APT::FTPArchive::Release::Codename=stable \
    -o "APT::FTPArchive::Release::Architectures=$archs" \
    -o APT::FTPArchive::Release::Components=main \
    -o APT::FTPArchive::Release::Description="exalsius node agent" \
    release dists/stable >"$tmp/Release"
  mv "$tmp/Release" dists/stable/Release
  gpg_sign --clearsign -o dists/stable/InRelease dists/stable/Release
  gpg_sign --detach-sign --armor -o dists/stable/Release.gpg dists/stable/Release
)

# yum/dnf: repodata per architecture (baseurl=…/rpm/$basearch), repomd.xml signed detached.
for dir in "$repo"/rpm/*/; do
  [ -d "$dir" ] || continue
  compgen -G "$dir*.rpm" >/dev/null || continue
  createrepo_c --quiet --update "$dir" >"$tmp/createrepo.log" 2>&1 \
    || { cat "$tmp/createrepo.log" >&2; die "createrepo_c $dir"; }
  gpg_sign --detach-sign --armor -o "${dir}repodata/repomd.xml.asc" "${dir}repodata/repomd.xml"
done

gpg --batch --yes --quiet --export "$fpr" >"$repo/exalsius-archive-keyring.gpg"
gpg --batch --yes --quiet --armor --export "$fpr" >"$repo/RPM-GPG-KEY-exalsius"
if [ -n "$url" ]; then
  cat >"$repo/exalsius.sources" <<EOF
Types: deb
URIs: $url/apt
Suites: stable
Components: main
Signed-By: /usr/share/keyrings/exalsius-archive-keyring.gpg
EOF
  cat >"$repo/exalsius.repo" <<EOF
[exalsius]
name=exalsius node agent
baseurl=$url/rpm/\$basearch
enabled=1
gpgcheck=1
repo_gpgcheck=1
gpgkey=$url/RPM-GPG-KEY-exalsius
EOF
fi

echo "repository $repo signed by $fpr:"
(cd "$repo" && find apt/pool rpm -type f \( -name '*.deb' -o -name '*.rpm' \) | sort | sed 's/^/  /')
