#!/usr/bin/env bash
# Benchmark of the image → ext4 rootfs conversion (issue 3).
#
# Builds a synthetic multi-layer image in the Docker daemon at $DOCKER_HOST (>= 1 GiB, >= 50k
# files, deletions and overwrites across 6 layers on $BUILDER_TEST_BASE_IMAGE), then times, in
# the same run and alternating the order each round, from the image in the daemon to a finished,
# synced ext4 file:
#   ours              `builder-agent convert-image` (as the pipeline does: the image's overlay2 layer
#                     directories read in place when readable here, else docker save)
#   ours_docker_save  docker save to a file, then `builder-agent convert` (the path without the layer
#                     directories)
#   export_tar_mkfs   docker export | tar -x into a directory, then mkfs.ext4 -d (hypeman, BuildBuddy)
#   mkfs_loop_export  sparse file + mkfs.ext4 + loop mount + docker export | tar -x (ignite, E2B)
#   raw_write         dd conv=fsync of the rootfs's used byte count (the physical floor)
# plus, for reference, docker_save_only and docker_export_only (to /dev/null).
# Prints name=seconds (median over rounds), the converter's peak RSS, and ends with
#   ratio_vs_best_baseline=ours/min(export_tar_mkfs,mkfs_loop_export)
#   ratio_vs_raw_write=ours/raw_write
#
# Runs as root (loop mounts) and installs what is missing, as scripts/test.sh does: it uses the
# Docker daemon and base image of the test services (scripts/lib/services.sh), started here when
# DOCKER_HOST and BUILDER_TEST_BASE_IMAGE are not both set, and stopped on exit when this run
# started them (running ones are reused and left running). Knobs (environment):
#   BENCH_DIR (/var/tmp/bench-rootfs)  BENCH_ROUNDS (2)  BENCH_SMALL_FILES (52000)
#   BENCH_BIG_MIB (1024)  BUILDER_AGENT (target/release/builder-agent, built if missing)
#   BENCH_KEEP_IMAGE=1 keeps the image (and reuses it next time when the knobs are unchanged).
#   BENCH_FS_GIB=N runs everything in a fresh N GiB loop-mounted ext4 at BENCH_DIR (mounted
#   without online discard, as a VM's scratch disk would be), isolating the host's mount options.
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "bench-rootfs: run as root (loop mounts)" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/services.sh
source "$repo/scripts/lib/services.sh"
bt_ensure_commands dumpe2fs=e2fsprogs mkfs.ext4=e2fsprogs mountpoint=util-linux python3=python3
[ -x /usr/bin/time ] || bt_apt_install time
leased=false
if [ -z "${DOCKER_HOST:-}" ] || [ -z "${BUILDER_TEST_BASE_IMAGE:-}" ]; then
	bt_ensure_deps
	bt_lease_take
	leased=true
	trap 'bt_lease_release' EXIT
	bt_start_all --no-s3
	eval "$(bt_env)"
fi
docker=/usr/bin/docker
dir=${BENCH_DIR:-/var/tmp/bench-rootfs}
rounds=${BENCH_ROUNDS:-2}
small_files=${BENCH_SMALL_FILES:-52000}
big_mib=${BENCH_BIG_MIB:-1024}
agent=${BUILDER_AGENT:-$repo/target/release/builder-agent}
params="base=$BUILDER_TEST_BASE_IMAGE small=$small_files big=$big_mib"
image=bench-rootfs:$small_files-$big_mib

log() { echo "bench-rootfs: $*" >&2; }
now() { date +%s.%N; }
# Sets $result to the seconds between two `now` values.
elapsed() { result=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"); }

# Removes every run's outputs; called after each run, outside the timing, followed by sync, so
# no run pays for freeing the previous one's blocks.
clean_outputs() {
	rm -rf "$dir/image.tar" "$dir/ours.ext4" "$dir/ours-save.ext4" "$dir/work" "$dir/extract" "$dir/b.ext4" "$dir/c.ext4" "$dir/raw.bin"
}

cleanup() {
	mountpoint -q "$dir/mnt" && umount "$dir/mnt"
	[ -n "${cid:-}" ] && $docker rm -f "$cid" >/dev/null 2>&1
	[ "${BENCH_KEEP_IMAGE:-0}" = 1 ] || $docker rmi -f "$image" >/dev/null 2>&1 || true
	clean_outputs
	rm -rf "$dir/context"
	if [ -n "${BENCH_FS_GIB:-}" ] && mountpoint -q "$dir"; then umount "$dir" && rm -f "$dir.img"; fi
}
finish() {
	cleanup || true
	if $leased; then bt_lease_release; fi
}
trap finish EXIT

# shellcheck source=scripts/lib/toolchain.sh
source "$repo/scripts/lib/toolchain.sh"
bt_ensure_release_binary "$agent" builder-agent "$repo"

mkdir -p "$dir"
if [ -n "${BENCH_FS_GIB:-}" ]; then
	truncate -s "${BENCH_FS_GIB}G" "$dir.img"
	mkfs.ext4 -q -F "$dir.img"
	mount -o loop "$dir.img" "$dir"
fi
if [ "$($docker image inspect -f '{{index .Config.Labels "bench.params"}}' "$image" 2>/dev/null)" != "$params" ]; then
	log "generating the build context ($small_files small files, $big_mib MiB in large files)"
	rm -rf "$dir/context"
	python3 - "$dir/context" "$small_files" "$big_mib" <<-'EOF'
		import os, random, sys
		root, small, big_mib = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
		rng = random.Random(42)
		def write(path, data):
		    os.makedirs(os.path.dirname(path), exist_ok=True)
		    with open(path, "wb") as f:
		        f.write(data)
		for part in ("a", "b"):
		    for i in range(small // 2):
		        write(f"{root}/{part}/d{i // 500:03d}/f{i:06d}", rng.randbytes(rng.randint(100, 8000)))
		# Large files: 80 % in 8 files, 20 % in one file that a later layer overwrites.
		chunk = 1 << 20
		os.makedirs(f"{root}/big", exist_ok=True)
		for i in range(8):
		    with open(f"{root}/big/f{i}", "wb") as f:
		        for _ in range(big_mib * 8 // 10 // 8):
		            f.write(os.urandom(chunk))
		os.makedirs(f"{root}/over/big", exist_ok=True)
		with open(f"{root}/over/big/f7", "wb") as f:
		    for _ in range(big_mib * 2 // 10):
		        f.write(os.urandom(chunk))
		for i in range(0, small // 2, 10):
		    write(f"{root}/over/a/d{i // 500:03d}/f{i:06d}", rng.randbytes(rng.randint(100, 8000)))
	EOF
	cat >"$dir/context/Dockerfile" <<-EOF
		FROM $BUILDER_TEST_BASE_IMAGE
		COPY a/ /data/a/
		COPY b/ /data/b/
		COPY big/ /data/big/
		RUN rm -rf /data/a/d00* /data/big/f0 && mkdir -p /data/new && echo new > /data/new/file
		COPY over/ /data/
		RUN chmod -R go-w /data/b/d001 && rm -f /data/b/d002/*
		LABEL bench.params="$params"
	EOF
	log "building $image"
	DOCKER_BUILDKIT=0 $docker build -q -t "$image" "$dir/context" >/dev/null
	rm -rf "$dir/context"
fi
image_bytes=$($docker image inspect -f '{{.Size}}' "$image")
# Size for the baselines' file systems: content + 30 % + 64 MiB, like ours roughly.
fs_bytes=$(((image_bytes * 13 / 10 + (64 << 20)) / 4096 * 4096))
log "image: $image_bytes bytes; baseline file systems: $fs_bytes bytes"

mkdir -p "$dir/mnt"
declare -A runs

run_ours() {
	mkdir -p "$dir/work"
	local t0 t1
	t0=$(now)
	/usr/bin/time -f %M -o "$dir/rss" \
		"$agent" convert-image "$image" "$dir/ours.ext4" --work-dir "$dir/work" >"$dir/ours.json"
	sync -f "$dir/ours.ext4"
	t1=$(now)
	peak_rss_kib=$(cat "$dir/rss")
	route=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["route"])' "$dir/ours.json")
	[ -n "${used_mib:-}" ] || used_mib=$(dumpe2fs -h "$dir/ours.ext4" 2>/dev/null |
		awk -F: '/^Block count/{c=$2} /^Free blocks/{f=$2} /^Block size/{b=$2} END{print int((c-f)*b/1048576)+1}')
	ours_size_bytes=$(stat -c %s "$dir/ours.ext4")
	ours_allocated_bytes=$(($(stat -c %b "$dir/ours.ext4") * 512))
	ours_sha256=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["sha256"])' "$dir/ours.json")
	elapsed "$t0" "$t1"
}

run_ours_docker_save() {
	mkdir -p "$dir/work"
	local t0 t1
	t0=$(now)
	$docker save -o "$dir/image.tar" "$image"
	"$agent" convert "$dir/image.tar" "$dir/ours-save.ext4" --work-dir "$dir/work" >"$dir/ours-save.json"
	sync -f "$dir/ours-save.ext4"
	t1=$(now)
	ours_save_sha256=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["sha256"])' "$dir/ours-save.json")
	elapsed "$t0" "$t1"
}

run_export_tar_mkfs() {
	mkdir -p "$dir/extract"
	local t0 t1
	t0=$(now)
	cid=$($docker create "$image" /bin/true)
	$docker export "$cid" | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$dir/extract"
	$docker rm "$cid" >/dev/null && cid=
	truncate -s "$fs_bytes" "$dir/b.ext4"
	mkfs.ext4 -q -F -d "$dir/extract" "$dir/b.ext4"
	sync -f "$dir/b.ext4"
	t1=$(now)
	elapsed "$t0" "$t1"
}

run_mkfs_loop_export() {
	local t0 t1
	t0=$(now)
	truncate -s "$fs_bytes" "$dir/c.ext4"
	mkfs.ext4 -q -F "$dir/c.ext4"
	mount -o loop "$dir/c.ext4" "$dir/mnt"
	cid=$($docker create "$image" /bin/true)
	$docker export "$cid" | tar --numeric-owner --xattrs --xattrs-include='*' -xpf - -C "$dir/mnt"
	$docker rm "$cid" >/dev/null && cid=
	umount "$dir/mnt"
	sync -f "$dir/c.ext4"
	t1=$(now)
	elapsed "$t0" "$t1"
}

run_raw_write() {
	local t0 t1
	t0=$(now)
	dd if=/dev/zero of="$dir/raw.bin" bs=1M count="$used_mib" conv=fsync status=none
	t1=$(now)
	elapsed "$t0" "$t1"
}

run_docker_save_only() {
	local t0 t1
	t0=$(now)
	$docker save "$image" >/dev/null
	t1=$(now)
	elapsed "$t0" "$t1"
}

run_docker_export_only() {
	local t0 t1
	t0=$(now)
	cid=$($docker create "$image" /bin/true)
	$docker export "$cid" >/dev/null
	$docker rm "$cid" >/dev/null && cid=
	t1=$(now)
	elapsed "$t0" "$t1"
}

# ours runs first in round 1 so raw_write knows the used size; each round rotates the order.
order=(ours ours_docker_save export_tar_mkfs mkfs_loop_export raw_write docker_save_only docker_export_only)
clean_outputs
sync
for round in $(seq 1 "$rounds"); do
	for name in "${order[@]}"; do
		"run_$name"
		clean_outputs
		sync
		if [ "$name" = ours ]; then runs[peak_rss_kib]+="$peak_rss_kib "; fi
		runs[$name]+="$result "
		log "round $round: $name=$result"
	done
	order=("${order[@]:1}" "${order[0]}")
done

median() { python3 -c "import statistics, sys; print(f'{statistics.median(map(float, sys.argv[1:])):.3f}')" $1; }
for name in ours ours_docker_save export_tar_mkfs mkfs_loop_export raw_write docker_save_only docker_export_only; do
	declare "m_$name=$(median "${runs[$name]}")"
	echo "$name=$(eval echo "\$m_$name")"
done
echo "ours_route=$route"
echo "ours_peak_rss_kib=$(median "${runs[peak_rss_kib]}" | cut -d. -f1)"
if [ "$ours_sha256" = "$ours_save_sha256" ]; then
	echo "ours_same_bytes_as_docker_save=yes"
else
	echo "ours_same_bytes_as_docker_save=no ($ours_sha256 vs $ours_save_sha256)"
fi
echo "ours_size_bytes=$ours_size_bytes ours_allocated_bytes=$ours_allocated_bytes used_mib=$used_mib"
python3 - "$m_ours" "$m_export_tar_mkfs" "$m_mkfs_loop_export" "$m_raw_write" <<-'EOF'
	import sys
	ours, b, c, raw = map(float, sys.argv[1:])
	print(f"ratio_vs_best_baseline={ours / min(b, c):.2f}")
	print(f"ratio_vs_raw_write={ours / raw:.2f}")
EOF
rm -f "$dir/rss" "$dir/ours.json" "$dir/ours-save.json"
