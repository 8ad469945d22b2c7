#!/usr/bin/env bash
# Builds the .deb and .rpm into target/packages/ (or $1).
#
# The binary is linked for glibc 2.28 (RHEL/Alma/Rocky 8+, Ubuntu 20.04+, Debian 11+) with
# cargo-zigbuild and Zig from PyPI, and stays dynamically linked against glibc: a static musl
# binary could not dlopen the NVIDIA driver's libnvidia-ml.so.1. Man pages and shell
# completions are generated from the clap definitions (examples/gen-docs.rs).
#
# Environment: DEB_REVISION (default 1) sets the package revision, e.g. to build an
# "upgrade" of the same version in tests.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-target/packages}
target=x86_64-unknown-linux-gnu
glibc=2.28
zig_version=0.14.1

need_cargo_tool() { # binary crate
  command -v "$1" >/dev/null 2>&1 || cargo install --locked "$2"
}
need_cargo_tool cargo-deb cargo-deb
need_cargo_tool cargo-generate-rpm cargo-generate-rpm
need_cargo_tool cargo-zigbuild cargo-zigbuild
python3 -c 'import ziglang' 2>/dev/null || python3 -m pip install -q "ziglang==$zig_version"

cargo zigbuild --release --locked --target "$target.$glibc" --bin exalsius-node-agent

assets=target/assets
rm -rf "$assets"
mkdir -p "$assets/man" "$out"
cp "target/$target/release/exalsius-node-agent" "$assets/"
cargo run --quiet --locked --example gen-docs -- "$assets/gen"
for page in "$assets"/gen/*.1; do
  gzip -9n -c "$page" > "$assets/man/$(basename "$page").gz"
done
cp "$assets/gen/exalsius-node-agent.bash" "$assets/gen/_exalsius-node-agent" \
   "$assets/gen/exalsius-node-agent.fish" "$assets/"

revision=${DEB_REVISION:-1}
version=$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["packages"][0]["version"])')
cargo deb --no-build --no-strip --deb-version "$version-$revision" --output "$out/"
cargo generate-rpm --set-metadata "release = \"$revision\"" --output "$out/"
ls -l "$out"
