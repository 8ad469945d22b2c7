#!/usr/bin/env bash
# Installs what building and proving the arm64 packages needs, from Debian's packages:
# rustup cannot fetch an aarch64 standard library here, but Debian bookworm's rustc-web (1.96)
# with libstd-rust-web-dev:arm64 (multiarch) has one; C parts and the stub NVML are compiled
# with gcc-aarch64-linux-gnu (the agent itself links through Zig, for the glibc 2.28
# ceiling); qemu-user-static with binfmt_misc runs the result. Idempotent; needs root.
# Exit 1 (with the reason) where the arm64 architecture cannot be added.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64 || { echo "dpkg --add-architecture arm64 failed" >&2; exit 1; }
  apt-get update -qq
fi
need=()
[ -x /usr/bin/rustc ] && [ -d /usr/lib/rustlib/aarch64-unknown-linux-gnu ] || need+=(rustc-web libstd-rust-web-dev:arm64)
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 || need+=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)
command -v qemu-aarch64-static >/dev/null 2>&1 || need+=(qemu-user-static)
command -v update-binfmts >/dev/null 2>&1 || need+=(binfmt-support)
command -v file >/dev/null 2>&1 || need+=(file)
if [ "${#need[@]}" -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null || { echo "cannot install ${need[*]}" >&2; exit 1; }
fi
# binfmt_misc lets a chroot into an arm64 root run its programs (debootstrap's second stage).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || true
fi
if [ -e /proc/sys/fs/binfmt_misc/register ] && [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || echo "note: binfmt_misc is not available: the arm64 root cannot be made" >&2
exit 0
