#!/usr/bin/env bash
# Benchmark of the build cache's fork and commit (issue 10): what a build pays to get its
# private copy of a key's cache disk, and to make it the committed disk afterwards, by the file
# system under the pool. Makes a cache disk as the node does (`fork-bench seed`: builder-ext4's
# empty disk, label `cache`) of BENCH_DISK_MIB, fills it through a loop mount with
# BENCH_DATA_MIB of random files, commits it into three pools and times, with the crate's own
# code (crates/builder-cache/examples/fork-bench.rs: CachePool::fork and ::commit, the page
# cache dropped before each fork), BENCH_ROUNDS rounds interleaving the pools:
#   sparse_copy    the pool on the host's file system (ext4 here): SEEK_DATA/SEEK_HOLE ranges
#                  copied with copy_file_range
#   reflink_xfs    the pool's own XFS reflink image, made and loop-mounted by CachePool::open
#                  (PoolConfig.reflink_image_bytes): FICLONE
#   reflink_btrfs  a loop-mounted btrfs: FICLONE
# Prints each round, then median_fork_ms_<pool>, median_commit_ms_<pool>, and
# reflink_xfs_over_sparse_copy= / reflink_btrfs_over_sparse_copy= (median fork time over the
# sparse copy's). A commit is: superblock check, fsync of the fork, rename, metadata, dir fsyncs.
#
# Runs as root (loop mounts, dropping the page cache); installs xfsprogs and btrfs-progs when
# missing. Everything lives under BENCH_DIR and is unmounted and removed at the end.
# Knobs (environment): BENCH_DIR (/var/tmp/bench-cache-fork)  BENCH_ROUNDS (5)
#   BENCH_DATA_MIB (1024)  BENCH_DISK_MIB (4096)  PROFILE (release; or debug)  KEEP_WORK=1
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib/services.sh
source scripts/lib/services.sh
bt_require_root "$0"
export PATH=$PATH:/usr/sbin:/sbin
bt_ensure_commands mkfs.xfs=xfsprogs mkfs.btrfs=btrfs-progs mountpoint=util-linux

work=${BENCH_DIR:-/var/tmp/bench-cache-fork}
rounds=${BENCH_ROUNDS:-5}
data_mib=${BENCH_DATA_MIB:-1024}
disk_mib=${BENCH_DISK_MIB:-4096}
profile=${PROFILE:-release}
log() { echo "bench-cache-fork: $*" >&2; }

cleanup() {
	local mnt
	for mnt in "$work/seed.mnt" "$work/xfs-pool" "$work/btrfs-pool"; do
		while mountpoint -q "$mnt"; do umount "$mnt"; done
	done
	[[ ${KEEP_WORK:-} == 1 ]] || rm -rf "$work"
}
cleanup
trap cleanup EXIT
mkdir -p "$work/seed.mnt" "$work/btrfs-pool"

if [[ $profile == release ]]; then
	cargo build -q --release -p builder-cache --example fork-bench
else
	cargo build -q -p builder-cache --example fork-bench
fi
bench=$repo/target/$profile/examples/fork-bench

log "a ${disk_mib} MiB cache disk holding ${data_mib} MiB of random files"
"$bench" seed "$work/seed.ext4" "$disk_mib"
mount -t ext4 -o loop "$work/seed.ext4" "$work/seed.mnt"
for ((i = 0; i < data_mib / 4; i++)); do
	mkdir -p "$work/seed.mnt/layer-$((i % 16))"
	head -c 4M /dev/urandom >"$work/seed.mnt/layer-$((i % 16))/blob-$i"
done
umount "$work/seed.mnt"

# Room for the committed disk and one fork of it, copied in full, with some to spare.
pool_bytes=$(((2 * disk_mib + 1024) << 20))
truncate -s "$pool_bytes" "$work/btrfs.img"
mkfs.btrfs -q "$work/btrfs.img" >/dev/null 2>&1 || mkfs.btrfs "$work/btrfs.img"
mount -t btrfs -o loop "$work/btrfs.img" "$work/btrfs-pool"

log "host file system under $work: $(findmnt -no FSTYPE -T "$work")"
"$bench" run "$rounds" "$work/seed.ext4" \
	"sparse_copy=$work/ext4-pool" \
	"reflink_xfs=$work/xfs-pool@$pool_bytes" \
	"reflink_btrfs=$work/btrfs-pool"
