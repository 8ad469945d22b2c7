#!/bin/sh
# Fetches NVIDIA's real userspace NVML (three driver generations) and nvidia-smi from Debian's
# non-free component into a cache, for tests/it/nvml_real.rs. Never installs anything: a
# private apt configuration (its own sources, lists and cache) downloads the .debs and
# `dpkg-deb -x` unpacks each into $cache/<generation>/. The mirror is the one this machine's
# apt configuration already uses.
#
#   packaging/fetch-nvidia.sh [CACHE]   (default: $EXALSIUS_CI_CACHE/nvidia, else
#                                        /var/cache/exalsius-ci/nvidia)
#
# Prints the cache directory on its last line. Idempotent: a generation already unpacked is
# not fetched again.
set -eu

cache=${1:-${EXALSIUS_CI_CACHE:-/var/cache/exalsius-ci}/nvidia}
arch=$(dpkg --print-architecture)

# The Debian mirror this machine uses (its apt sources), without the suite.
mirror=$(grep -rhoE '^(URIs:|deb)[[:space:]]+[^ ]*/debian/?([[:space:]]|$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | awk '{print $2}' | sed 's,/*$,,' | head -1)
security=$(grep -rhoE '^(URIs:|deb)[[:space:]]+[^ ]*/debian-security/?([[:space:]]|$)' \
  /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
  | awk '{print $2}' | sed 's,/*$,,' | head -1)
[ -n "$mirror" ] || { echo "fetch-nvidia: no Debian mirror in this machine's apt sources" >&2; exit 1; }
[ -n "$security" ] || security=${mirror}-security

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# fetch NAME SOURCES PACKAGES...: downloads PACKAGES' candidates from SOURCES into
# $cache/NAME/ (unpacked), with an apt state of its own.
fetch() {
  name=$1 sources=$2
  shift 2
  if [ -f "$cache/$name/.complete" ]; then
    return 0
  fi
  d=$work/$name
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/debs"
  printf '%s\n' "$sources" >"$d/sources.list"
  # shellcheck disable=SC2086
  apt() {
    apt-get -qq -o APT::Sandbox::User=root -o Dir::Etc::SourceList="$d/sources.list" -o Dir::Etc::SourceParts=/dev/null \
      -o Dir::State::Lists="$d/lists" -o Dir::Cache="$d/cache" \
      -o Dir::State::status=/dev/null -o APT::Architecture="$arch" "$@"
  }
  apt update
  rm -rf "${cache:?}/${name:?}"
  mkdir -p "$cache/$name"
  (cd "$d/debs" && apt download "$@")
  for deb in "$d"/debs/*.deb; do
    dpkg-deb -x "$deb" "$cache/$name"
    dpkg-deb --showformat='${Package} ${Version}\n' -W "$deb" >>"$cache/$name/.versions"
  done
  touch "$cache/$name/.complete"
}

signed="[signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]"
fetch 470 "deb $signed $mirror bookworm non-free" libnvidia-tesla-470-ml1
fetch 535 "deb $signed $mirror bookworm non-free
deb $signed $security bookworm-security non-free" libnvidia-ml1 nvidia-smi
fetch 550 "deb $signed $mirror trixie non-free" libnvidia-ml1 nvidia-smi
for g in 470 535 550; do
  echo "fetch-nvidia: $g: $(tr '\n' ' ' <"$cache/$g/.versions")" >&2
done
echo "$cache"
