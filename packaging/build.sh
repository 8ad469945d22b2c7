#!/usr/bin/env bash
# Builds the .deb and .rpm into target/packages/ (or OUT), for x86-64 and arm64.
#   bash packaging/build.sh [--arch amd64|arm64|all] [OUT]        (default: all)
#
# Both binaries are linked for glibc 2.28 (RHEL/Alma/Rocky 8+, Ubuntu 20.04+, Debian 11+) with
# cargo-zigbuild and Zig from PyPI, and stay dynamically linked against glibc: a static musl
# binary could not dlopen the NVIDIA driver's libnvidia-ml.so.1. x86-64 builds with the rustup
# toolchain; arm64 with Debian's rustc-web and its aarch64 standard library (rustup cannot fetch
# one here; packaging/arm64-tools.sh installs it). Each binary carries its dependency list
# (cargo auditable), so scanners operators already run (trivy, grype, syft) can audit it. Man
# pages and shell completions are generated from the clap definitions (examples/gen-docs.rs).
# Writes SHA256SUMS beside the packages and prints what it built.
#
# Environment: DEB_REVISION (default 1) sets the package revision, e.g. to build an
# "upgrade" of the same version in tests. SOURCE_DATE_EPOCH (default: the commit's time) is
# every timestamp the packages carry, so two builds of one commit are the same bytes
# (packaging/test-reproducible.sh checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
arch=all
if [ "${1:-}" = --arch ]; then
  arch=$2
  shift 2
fi
case "$arch" in amd64 | arm64 | all) ;; *) echo "--arch amd64|arm64|all, not $arch" >&2; exit 2 ;; esac
out=${1:-target/packages}
glibc=2.28
zig_version=0.14.1

need_cargo_tool() { # binary crate
  command -v "$1" >/dev/null 2>&1 || cargo install --locked "$2"
}
need_cargo_tool cargo-deb cargo-deb
need_cargo_tool cargo-generate-rpm cargo-generate-rpm
need_cargo_tool cargo-zigbuild cargo-zigbuild
need_cargo_tool cargo-auditable cargo-auditable
python3 -c 'import ziglang' 2>/dev/null || python3 -m pip install -q "ziglang==$zig_version"

assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$out"
cargo run --quiet --locked --example gen-docs -- "$assets/gen"
for page in "$assets"/gen/*.1; do
  gzip -9n -c "$page" > "$assets/man/$(basename "$page").gz"
done
cp "$assets/gen/exalsius-node-agent.bash" "$assets/gen/_exalsius-node-agent" \
   "$assets/gen/exalsius-node-agent.fish" "$assets/"

revision=${DEB_REVISION:-1}
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git log -1 --format=%ct 2>/dev/null || echo 0)
fi
export SOURCE_DATE_EPOCH
version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')

# build_one DEB_ARCH TRIPLE TARGET_DIR [RUSTC]
build_one() {
  local deb_arch=$1 triple=$2 target_dir=$3 rustc=${4:-}
  # cargo auditable embeds the dependency list (as the rustc wrapper) around cargo zigbuild.
  env ${rustc:+RUSTC=$rustc} CARGO_TARGET_DIR="$target_dir" \
    cargo auditable zigbuild --release --locked --target "$triple.$glibc" --bin exalsius-node-agent
  cp "$target_dir/$triple/release/exalsius-node-agent" "$assets/exalsius-node-agent"
  cargo deb --no-build --no-strip --target "$triple" --deb-version "$version-$revision" --output "$out/"
  cargo generate-rpm --target "$triple" --set-metadata "release = \"$revision\"" --output "$out/"
  mkdir -p "$assets/$deb_arch"
  cp "$assets/exalsius-node-agent" "$assets/$deb_arch/"
}

if [ "$arch" = all ] || [ "$arch" = amd64 ]; then
  build_one amd64 x86_64-unknown-linux-gnu target
fi
if [ "$arch" = all ] || [ "$arch" = arm64 ]; then
  if bash packaging/arm64-tools.sh; then
    build_one arm64 aarch64-unknown-linux-gnu target/arm64 /usr/bin/rustc
  elif [ "$arch" = arm64 ]; then
    exit 1
  else
    echo "arm64: SKIPPED: the arm64 architecture or its cross toolchain cannot be installed on this machine (see above)"
  fi
fi
# The x86-64 binary stays at target/assets/exalsius-node-agent (the package proof reads it).
if [ -e "$assets/amd64/exalsius-node-agent" ]; then
  cp "$assets/amd64/exalsius-node-agent" "$assets/exalsius-node-agent"
fi

. packaging/checks.sh
(cd "$out" && find . -maxdepth 1 -type f \( -name '*.deb' -o -name '*.rpm' \) -printf '%P\n' | sort | xargs sha256sum > SHA256SUMS)
printf '%-48s %-8s %10s %s\n' file arch bytes "highest GLIBC_"
for f in $(cd "$out" && find . -maxdepth 1 -type f \( -name '*.deb' -o -name '*.rpm' \) -printf '%P\n' | sort); do
  case "$f" in *arm64.deb | *aarch64.rpm) a=arm64 ;; *) a=amd64 ;; esac
  [ -e "$assets/$a/exalsius-node-agent" ] || continue # built earlier, not by this run
  g=$(highest_glibc "$assets/$a/exalsius-node-agent")
  printf '%-48s %-8s %10s %s\n' "$f" "$a" "$(stat -c %s "$out/$f")" "$g"
done
