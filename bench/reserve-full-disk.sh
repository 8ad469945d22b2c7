#!/usr/bin/env bash
# The token reserve (src/state/reserve.rs) on full file systems: for each file system, a
# loop-mounted image (tmpfs: a small tmpfs) in a private mount namespace; the reserve is opened
# on the empty file system, the file system is filled to ENOSPC, then the reserve is
# overwritten in place 200 times (the agent's own code: the ignored lib test
# `bench_overwrites_on_a_full_file_system`). btrfs runs twice: with the no-CoW attribute the
# agent sets on the empty file, and without it (a reserve file that existed before, so the
# attribute cannot be set). Root only; needs mkfs.xfs (xfsprogs) and mkfs.btrfs (btrfs-progs).
#
# usage: sudo bench/reserve-full-disk.sh     (prints one RESULT line per file system)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root (loop devices, mounts)" >&2; exit 1; }
bin=$(cargo test --locked --lib --no-run --message-format=json 2>/dev/null |
    sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -1)
[ -x "$bin" ] || { echo "no lib test binary" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# One case inside its own private mount namespace: $1 name, $2 fs, $3 size, $4 "cow" to keep
# the reserve copy-on-write.
one() {
    local name=$1 fs=$2 size=$3 cow=${4:-}
    unshare --mount --propagation private -- bash -euo pipefail -c '
        name=$1; fs=$2; size=$3; cow=$4; bin=$5; work=$6
        mnt=$work/$name; mkdir -p "$mnt"
        if [ "$fs" = tmpfs ]; then
            mount -t tmpfs -o size="$size" tmpfs "$mnt"
        else
            img=$work/$name.img; truncate -s "$size" "$img"
            dev=$(losetup -f --show "$img")
            trap "umount -l \"$mnt\" 2>/dev/null; losetup -d $dev; rm -f \"$img\"" EXIT
            case $fs in
                ext4) mkfs.ext4 -q "$dev" ;;
                xfs) mkfs.xfs -q -f "$dev" ;;
                btrfs) mkfs.btrfs -q -f "$dev" >/dev/null 2>&1 ;;
            esac
            mount "$dev" "$mnt"
        fi
        if [ -n "$cow" ]; then
            # A reserve that exists already is not empty: the agent cannot set +C on it.
            head -c $((3 * 20480)) /dev/zero > "$mnt/state.reserve"
        fi
        out=$(EXALSIUS_RESERVE_BENCH_DIR=$mnt "$bin" --ignored --exact --nocapture \
            state::reserve::tests::bench_overwrites_on_a_full_file_system 2>&1 | grep RESULT)
        attr=$(lsattr -d "$mnt/state.reserve" 2>/dev/null | cut -c1-22 | tr -d " " || true)
        echo "$name: $out lsattr=$attr"
    ' _ "$name" "$fs" "$size" "$cow" "$bin" "$work"
}

one tmpfs tmpfs 1m
one ext4 ext4 64m
one xfs xfs 320m
one btrfs-nocow btrfs 128m
one btrfs-cow btrfs 128m cow
