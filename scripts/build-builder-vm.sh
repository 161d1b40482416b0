#!/usr/bin/env bash
# `make builder-vm`: builds everything a builder VM boots from.
#
#   build/vms/vmlinux               guest kernel (scripts/build-kernel.sh, cached by its inputs)
#   build/vms/builder-rootfs.ext4   root filesystem: debootstrap minbase + CHROOT_CMDS below
#                                   + vm/rootfs-overlay/ + builder-agent as /usr/local/bin/builder-agent
#   build/vms/builder-vm.json       versions, sha256 and size of each artifact, boot args,
#                                   default resources and the build parameter keys
#
# Each step leaves a stamp in build/vms/.stamps/ that records its inputs, so a rerun skips
# what is already done and redoes only what changed (an interrupted run resumes).
#
# Usage (as root): scripts/build-builder-vm.sh [--distro debian] [--suite SUITE]
#                                         [--mirror URL] [--disk-size SIZE] [--out DIR]
# The same settings as environment variables: BUILDER_VM_DISTRO, BUILDER_VM_SUITE,
# BUILDER_VM_MIRROR, BUILDER_VM_DISK_SIZE, BUILDER_VM_OUT. BUILDER_BIN_DIR names a directory
# with prebuilt static builder-agent and builder-init; without it they are built with cargo.
# PRELOAD_IMAGES="debian:bookworm-slim ./node.tar": base images baked into the image, each a
# reference in the host's Docker (saved with `docker save`) or a `docker save` tar file.
set -euo pipefail

# ---------------------------------------------------------------------------------------------
# CHROOT_CMDS: everything installed into the root filesystem. To add packages, edit this
# section and rerun `make builder-vm`: the change is detected and only this step and the image
# are redone. Runs inside the chroot with the distribution's apt sources configured, plus the
# pinned Debian 13 (trixie) source the Docker packages come from. $DOCKER_PACKAGES is
# "docker.io/trixie docker-cli/trixie docker-buildx/trixie containerd/trixie runc": Docker 26.1,
# buildx 0.13 and containerd 1.7 from Debian 13 with Debian 12's runc, the one list in
# scripts/lib/docker-packages.sh that the host's test dockerd is installed from as well.
# ---------------------------------------------------------------------------------------------
read -r -d '' CHROOT_CMDS <<'CHROOT' || true
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends \
	$DOCKER_PACKAGES \
	iptables iproute2 pigz xz-utils \
	git git-lfs openssh-client ca-certificates \
	build-essential make python3 nodejs npm golang default-jdk-headless ruby \
	awscli e2fsprogs procps
git lfs install --system --skip-repo
CHROOT
# ---------------------------------------------------------------------------------------------

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/docker-packages.sh
source "$repo_root/scripts/lib/docker-packages.sh"
distro=${BUILDER_VM_DISTRO:-debian}
suite=${BUILDER_VM_SUITE:-}
mirror=${BUILDER_VM_MIRROR:-}
disk_size=${BUILDER_VM_DISK_SIZE:-4G}
out=${BUILDER_VM_OUT:-$repo_root/build/vms}

usage() {
	sed -n '2,19s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
	exit "${1:-0}"
}
while [ $# -gt 0 ]; do
	case $1 in
	--distro) distro=$2; shift 2 ;;
	--suite) suite=$2; shift 2 ;;
	--mirror) mirror=$2; shift 2 ;;
	--disk-size) disk_size=$2; shift 2 ;;
	--out) out=$2; shift 2 ;;
	-h | --help) usage 0 ;;
	*) echo "unknown argument: $1" >&2; usage 2 ;;
	esac
done

script_started=$(date +%s.%N)
log() { printf '[builder-vm %6.1fs] %s\n' "$(echo "$(date +%s.%N) - $script_started" | bc)" "$*" >&2; }
die() { printf '[builder-vm] error: %s\n' "$*" >&2; exit 1; }

case $distro in
debian)
	suite=${suite:-bookworm}
	mirror=${mirror:-$(docker_pkgs_host_mirror)}
	mirror=${mirror:-http://deb.debian.org/debian}
	components=main
	security_mirror=${mirror%/}-security
	security_suite=$suite-security
	;;
ubuntu)
	# The builder's Docker is Debian 13's (scripts/lib/docker-packages.sh): Debian packages on
	# an Ubuntu base are not something to ship, and Ubuntu's own would be a second builder.
	die "--distro ubuntu is not supported: the builder's Docker 26.1 + buildx comes from Debian 13 (scripts/lib/docker-packages.sh)"
	;;
*) die "unknown distribution '$distro' (use debian)" ;;
esac
mirror=${mirror%/}

rootfs=$out/rootfs
stamps=$out/.stamps
image=$out/builder-rootfs.ext4
kernel=$out/vmlinux
manifest=$out/builder-vm.json
agent_in_rootfs=/usr/local/bin/builder-agent
boot_args="console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro init=$agent_in_rootfs"
# The root filesystem is mounted read-only, so every directory builder-agent mounts or binds
# something onto must already exist in the image (crates/builder-agent/src/vm.rs).
agent_mount_points=(mnt/scratch mnt/cache var/lib/docker var/lib/containerd var/log var/tmp run tmp dev proc sys)
# Base images baked into the image (the "pre-pull common base images" knob): builder-agent
# `docker load`s every tar in this directory before the build, so `FROM` needs no registry.
preload_dir=usr/share/builder-vm/images
preload_images=${PRELOAD_IMAGES:-}

# ---- preflight --------------------------------------------------------------------------------
[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot and image ownership need it)"
# What is missing is installed with apt-get, as scripts/test.sh does (bt_apt_install).
# shellcheck source=scripts/lib/services.sh
source "$repo_root/scripts/lib/services.sh"
export PATH=$PATH:/usr/sbin:/sbin
bt_ensure_commands debootstrap=debootstrap mkfs.ext4=e2fsprogs e2fsck=e2fsprogs unshare=util-linux \
	chroot=coreutils python3=python3 sha256sum=coreutils bc=bc curl=curl readelf=binutils
bt_ensure_kernel_deps
if [ -z "${BUILDER_BIN_DIR:-}" ]; then
	# shellcheck source=scripts/lib/toolchain.sh
	source "$repo_root/scripts/lib/toolchain.sh"
	bt_ensure_rust
fi
for tool in debootstrap mkfs.ext4 e2fsck unshare chroot python3 sha256sum bc curl readelf; do
	command -v "$tool" >/dev/null || die "'$tool' is needed and could not be installed"
done

# Free space, measured on a Debian 12 build: the root filesystem tree is about 2 GiB, the sparse
# image about 2.1 GiB allocated (written beside the old one, which goes only once the new one is
# checked, and redone whenever builder-agent changes), the kernel's source tree and objects in
# the cache about 1.5 GiB until it has been built once. PRELOAD_IMAGES come on top of this.
existing_dir() {
	local dir=$1
	while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
	echo "$dir"
}
mib_free() { df -P -k "$(existing_dir "$1")" | awk 'NR == 2 { print int($4 / 1024) }'; }
check_space() {
	local cache_root=${BUILDER_VM_CACHE:-/var/cache/builder-vm} kernel_version
	local out_need=2150 out_parts="image 2150 MiB" cache_need=0 free
	# A root filesystem whose packages are installed is reused (redone in place).
	if [ ! -f "$stamps/packages" ] || [ ! -d "$rootfs" ]; then
		out_need=$((out_need + 2048)) out_parts="root filesystem 2048 MiB, $out_parts"
	fi
	kernel_version=$(dpkg-query -W -f='${Version}' "${KERNEL_SOURCE_PKG:-linux-source-6.1}")
	if [ ! -f "$cache_root/kernel/src-$kernel_version/vmlinux" ]; then cache_need=1536; fi
	if [ "$cache_need" -gt 0 ] &&
		[ "$(stat -c %d "$(existing_dir "$out")")" = "$(stat -c %d "$(existing_dir "$cache_root")")" ]; then
		out_need=$((out_need + cache_need)) out_parts="$out_parts, kernel build in $cache_root $cache_need MiB"
		cache_need=0
	fi
	free=$(mib_free "$out")
	[ "$free" -ge "$out_need" ] ||
		die "not enough free disk space for $out: $out_need MiB are needed ($out_parts), $free MiB are free (free some, or --out DIR elsewhere)"
	if [ "$cache_need" -gt 0 ]; then
		free=$(mib_free "$cache_root")
		[ "$free" -ge "$cache_need" ] ||
			die "not enough free disk space for the kernel build in $cache_root: $cache_need MiB are needed, $free MiB are free (free some, or BUILDER_VM_CACHE=DIR elsewhere)"
	fi
	log "disk space: $out_need MiB needed for $out ($out_parts), $(mib_free "$out") MiB free"
}
check_space
if ! curl -fsS --max-time 20 -o /dev/null "$mirror/dists/$suite/Release"; then
	die "the mirror $mirror does not serve $distro $suite (cannot fetch $mirror/dists/$suite/Release); pass --mirror URL"
fi
mkdir -p "$out" "$stamps"
log "building $distro $suite from $mirror into $out"

stamp_matches() { [ -f "$stamps/$1" ] && [ "$(cat "$stamps/$1")" = "$2" ]; }
write_stamp() { printf '%s\n' "$2" >"$stamps/$1.tmp" && mv "$stamps/$1.tmp" "$stamps/$1"; }
timed() {
	local name=$1 started
	shift
	started=$(date +%s.%N)
	log "==> $name"
	"$@"
	log "<== $name: $(printf '%.1f' "$(echo "$(date +%s.%N) - $started" | bc)")s"
}

# Runs a shell script inside the root filesystem, in a private mount namespace so that
# /proc, /sys and /dev are unmounted by the kernel however the script ends.
in_chroot() {
	# shellcheck disable=SC2016 # expanded by the inner shell, from its arguments
	unshare --mount --propagation private -- /bin/sh -ec '
		mount -t proc proc "$1/proc"
		mount -t sysfs sysfs "$1/sys"
		mount --rbind /dev "$1/dev"
		exec chroot "$1" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
			HOME=/root LC_ALL=C.UTF-8 DOCKER_PACKAGES="$3" /bin/sh -euxc "$2"
	' in_chroot "$rootfs" "$1" "$DOCKER_PKGS_APT_ARGS"
}

# Copies vm/rootfs-overlay/ into the root filesystem, owned by root.
apply_overlay() {
	tar -C "$repo_root/vm/rootfs-overlay" --owner=0 --group=0 -c . | tar -C "$rootfs" -x --no-same-owner
}

# ---- 1. kernel (in the background: it needs CPU, the rootfs steps mostly need the network) ----
kernel_log=$out/kernel-build.log
log "==> kernel: scripts/build-kernel.sh in the background, log in $kernel_log"
kernel_started=$(date +%s.%N)
"$repo_root/scripts/build-kernel.sh" "$kernel" >"$kernel_log" 2>&1 &
kernel_pid=$!
trap 'kill "$kernel_pid" 2>/dev/null || true' EXIT
wait_for_kernel() {
	if ! wait "$kernel_pid"; then
		cat "$kernel_log" >&2
		die "the kernel build failed (log: $kernel_log)"
	fi
	trap - EXIT
	log "<== kernel: $(printf '%.1f' "$(echo "$(date +%s.%N) - $kernel_started" | bc)")s after start ($(tail -n1 "$kernel_log"))"
}

# ---- 2. debootstrap ---------------------------------------------------------------------------
debootstrap_inputs="$distro $suite $mirror minbase"
step_debootstrap() {
	if [ -d "$rootfs" ]; then
		log "discarding $rootfs (an interrupted or different debootstrap)"
		rm -rf "$rootfs"
	fi
	rm -f "$stamps"/*
	debootstrap --variant=minbase --components="${components// /,}" "$suite" "$rootfs" "$mirror"
	write_stamp debootstrap "$debootstrap_inputs"
}
if stamp_matches debootstrap "$debootstrap_inputs"; then
	log "debootstrap: done before ($debootstrap_inputs)"
else
	timed "debootstrap $debootstrap_inputs" step_debootstrap
fi

# ---- 3. packages (CHROOT_CMDS) ----------------------------------------------------------------
# The Docker packages and their apt source are inputs too (scripts/lib/docker-packages.sh).
packages_inputs=$({
	printf '%s\n%s\n%s %s %s\n' "$debootstrap_inputs" "$CHROOT_CMDS" "$security_mirror" "$security_suite" "$components"
	printf '%s\n' "$DOCKER_PKGS_APT_ARGS"
	declare -f docker_pkgs_write_apt_config
} | sha256sum | cut -d' ' -f1)
step_packages() {
	rm -f "$stamps/packages" "$stamps/image"
	{
		echo "deb $mirror $suite $components"
		echo "deb $mirror $suite-updates $components"
		echo "deb $security_mirror $security_suite $components"
	} >"$rootfs/etc/apt/sources.list"
	# Docker from Debian 13, pinned (on a trixie base the suite's own sources have it).
	if [ "$suite" != "$DOCKER_PKGS_SUITE" ]; then
		docker_pkgs_write_apt_config "$rootfs" "$mirror" >/dev/null
	fi
	# Daemons installed in the chroot must not start.
	printf '#!/bin/sh\nexit 101\n' >"$rootfs/usr/sbin/policy-rc.d"
	chmod 755 "$rootfs/usr/sbin/policy-rc.d"
	apply_overlay
	# apt needs the host's resolver while the packages are installed.
	rm -f "$rootfs/etc/resolv.conf"
	cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
	in_chroot "dpkg --configure -a
$CHROOT_CMDS"
	# Which suite each installed package came from, read while the package lists exist: only
	# the Docker packages may come from trixie (scripts/lib/docker-packages.sh).
	# shellcheck disable=SC2016 # expanded by dpkg-query
	in_chroot 'dpkg-query -W -f="\${Package}\n" | xargs apt-cache policy' >"$out/apt-policy.txt" 2>/dev/null
	docker_pkgs_check "$rootfs" "$out/apt-policy.txt" || die "the Docker packages in $rootfs are not the ones this project builds with (apt-cache policy: $out/apt-policy.txt)"
	log "Docker packages: $(docker_pkgs_versions "$rootfs")"
	rm -f "$rootfs/usr/sbin/policy-rc.d"
	write_stamp packages "$packages_inputs"
}
if stamp_matches packages "$packages_inputs"; then
	log "packages: done before"
else
	timed "packages (CHROOT_CMDS)" step_packages
fi

# ---- 4. builder-agent and builder-init ---------------------------------------------------------
# builder-agent is the VM's init; it injects builder-init (found beside it) into every rootfs it
# converts. Both must run before anything else and without the rootfs's dynamic loader.
# shellcheck source=scripts/lib/static-binaries.sh
source "$repo_root/scripts/lib/static-binaries.sh"
if [ -n "${BUILDER_BIN_DIR:-}" ]; then
	bin_dir=$BUILDER_BIN_DIR
else
	timed "builder-agent and builder-init (cargo, static)" build_static_binaries
	bin_dir=$STATIC_BIN_DIR
fi
agent_bin=$bin_dir/builder-agent
init_bin=$bin_dir/builder-init
check_static_binaries "$bin_dir" || die "$bin_dir cannot go into the builder VM"
agent_version=$("$agent_bin" --version) || die "'$agent_bin --version' failed"
agent_inputs=$(cat "$agent_bin" "$init_bin" | sha256sum | cut -d' ' -f1)
init_in_rootfs=$(dirname "$agent_in_rootfs")/builder-init
if stamp_matches agent "$agent_inputs" && cmp -s "$agent_bin" "$rootfs$agent_in_rootfs" \
	&& cmp -s "$init_bin" "$rootfs$init_in_rootfs"; then
	log "builder-agent: installed before ($agent_version)"
else
	install -D -m 0755 -o 0 -g 0 "$agent_bin" "$rootfs$agent_in_rootfs"
	install -D -m 0755 -o 0 -g 0 "$init_bin" "$rootfs$init_in_rootfs"
	write_stamp agent "$agent_inputs"
	log "builder-agent: installed $agent_version (and builder-init)"
fi

# ---- 5. overlay and cleanup (cheap, every run) -----------------------------------------------
step_finalize() {
	rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/cache/debconf/*-old \
		"$rootfs"/var/lib/dpkg/*-old "$rootfs"/tmp/* "$rootfs"/var/tmp/* "$rootfs"/root/.cache \
		"$rootfs"/root/.npm "$rootfs"/root/.wget-hsts "$rootfs"/etc/ssh/ssh_host_* \
		"$rootfs"/var/lib/dbus/machine-id "$rootfs"/usr/sbin/policy-rc.d
	find "$rootfs/var/log" -type f -delete
	# An empty machine-id: every boot gets a fresh one, no two VMs share it.
	: >"$rootfs/etc/machine-id"
	rm -f "$rootfs/etc/resolv.conf"
	apply_overlay
	local dir
	for dir in "${agent_mount_points[@]}"; do
		mkdir -p "$rootfs/$dir"
	done
}
timed "overlay and cleanup" step_finalize

# ---- 6. preloaded base images ------------------------------------------------------------------
# The stamp is the list plus each image's id (or tar's hash), so a changed tag is saved again.
preload_identity() {
	local ref id
	for ref in $preload_images; do
		if [ -f "$ref" ]; then
			printf '%s %s\n' "$ref" "$(sha256sum "$ref" | cut -d' ' -f1)"
		else
			id=$(docker image inspect --format '{{.Id}}' "$ref" 2>/dev/null) ||
				die "PRELOAD_IMAGES: '$ref' is neither a tar file nor an image in the host's Docker"
			printf '%s %s\n' "$ref" "$id"
		fi
	done
}
preload_inputs=$(preload_identity | sha256sum | cut -d' ' -f1)
step_preload() {
	local ref name
	rm -rf "${rootfs:?}/$preload_dir"
	mkdir -p "$rootfs/$preload_dir"
	for ref in $preload_images; do
		name=$(printf '%s' "$(basename "$ref" .tar)" | tr -c 'A-Za-z0-9._-' '_')
		if [ -f "$ref" ]; then
			cp "$ref" "$rootfs/$preload_dir/$name.tar"
		else
			docker save -o "$rootfs/$preload_dir/$name.tar" "$ref"
		fi
		log "preloaded $ref ($(du -h "$rootfs/$preload_dir/$name.tar" | cut -f1))"
	done
	write_stamp preload "$preload_inputs"
}
if stamp_matches preload "$preload_inputs"; then
	log "preloaded images: unchanged (${preload_images:-none})"
else
	timed "preloaded images (${preload_images:-none})" step_preload
fi

# ---- 7. ext4 image ----------------------------------------------------------------------------
overlay_hash=$(tar -C "$repo_root/vm/rootfs-overlay" --sort=name --owner=0 --group=0 --mtime=@0 -c . | sha256sum | cut -d' ' -f1)
image_inputs=$(printf '%s\n' "$packages_inputs" "$agent_inputs" "$overlay_hash" "$preload_inputs" "$disk_size" \
	"${agent_mount_points[*]}" | sha256sum | cut -d' ' -f1)
step_image() {
	rm -f "$stamps/image" "$image.tmp"
	truncate -s "$disk_size" "$image.tmp"
	mkfs.ext4 -q -F -L builder-root -m 0 -E root_owner=0:0 -d "$rootfs" "$image.tmp"
	local fsck_output
	fsck_output=$(e2fsck -fn "$image.tmp" 2>&1) || die "the new image fails e2fsck: $fsck_output"
	mv "$image.tmp" "$image"
	write_stamp image "$image_inputs"
}
if stamp_matches image "$image_inputs" && [ -f "$image" ]; then
	log "image: made before ($image)"
else
	timed "ext4 image ($disk_size, mkfs.ext4 -d)" step_image
fi

wait_for_kernel

# ---- 8. manifest -------------------------------------------------------------------------------
pkg_version() { dpkg-query --admindir="$rootfs/var/lib/dpkg" -W -f='${Version}' "$1"; }
write_manifest() {
	BVM_KERNEL="$kernel" BVM_IMAGE="$image" BVM_ROOTFS="$rootfs" \
	BVM_KERNEL_RELEASE="$(cat "$out/vmlinux.release")" \
	BVM_KERNEL_SOURCE="$(dpkg-query -W -f='${Package} ${Version}' "${KERNEL_SOURCE_PKG:-linux-source-6.1}")" \
	BVM_DISTRO="$distro" BVM_SUITE="$suite" BVM_MIRROR="$mirror" \
	BVM_DOCKER="$(pkg_version docker.io)" BVM_DOCKER_CLI="$(pkg_version docker-cli)" \
	BVM_BUILDX="$(pkg_version docker-buildx)" BVM_CONTAINERD="$(pkg_version containerd)" \
	BVM_DOCKER_PACKAGES="$DOCKER_PKGS_APT_ARGS" \
	BVM_RUNC="$(pkg_version runc)" BVM_GIT="$(pkg_version git)" BVM_AGENT="$agent_version" \
	BVM_BOOT_ARGS="$boot_args" BVM_AGENT_PATH="$agent_in_rootfs" BVM_PRELOAD_DIR="$preload_dir" \
	BVM_PARAMS_RS="$repo_root/crates/builder-contract/src/params.rs" \
		python3 - "$manifest.tmp" <<'PY'
import datetime, hashlib, json, os, re, sys

env = os.environ

def artifact(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    st = os.stat(path)
    return {
        "file": os.path.basename(path),
        "sha256": digest.hexdigest(),
        "size_bytes": st.st_size,
        "allocated_bytes": st.st_blocks * 512,
    }

def os_release(root):
    fields = {}
    with open(os.path.join(root, "etc/os-release")) as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep:
                fields[key] = value.strip('"')
    return fields.get("PRETTY_NAME", "")

params = open(env["BVM_PARAMS_RS"]).read()
keys = re.search(r"pub const PARAM_KEYS: \[&str; \d+\] = \[(.*?)\];", params, re.S)
if keys is None:
    sys.exit("PARAM_KEYS not found in " + env["BVM_PARAMS_RS"])

image = artifact(env["BVM_IMAGE"])
manifest = {
    "build_date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    "versions": {
        "kernel": env["BVM_KERNEL_RELEASE"],
        "kernel_source": env["BVM_KERNEL_SOURCE"],
        "distro": {"id": env["BVM_DISTRO"], "suite": env["BVM_SUITE"],
                   "name": os_release(env["BVM_ROOTFS"]), "mirror": env["BVM_MIRROR"]},
        "docker": env["BVM_DOCKER"],
        "docker_cli": env["BVM_DOCKER_CLI"],
        "buildx": env["BVM_BUILDX"],
        "containerd": env["BVM_CONTAINERD"],
        "runc": env["BVM_RUNC"],
        "git": env["BVM_GIT"],
        "agent": env["BVM_AGENT"],
    },
    # Where the builder's Docker comes from (scripts/lib/docker-packages.sh): apt arguments,
    # "PKG/SUITE" for the pinned Debian 13 packages, a bare name for the base suite's.
    "docker_packages": env["BVM_DOCKER_PACKAGES"].split(),
    "artifacts": {"kernel": artifact(env["BVM_KERNEL"]), "rootfs": image},
    "boot_args": env["BVM_BOOT_ARGS"],
    "agent_path": env["BVM_AGENT_PATH"],
    "root_device": "/dev/vda",
    "preloaded_images": sorted(os.listdir(os.path.join(env["BVM_ROOTFS"], env["BVM_PRELOAD_DIR"]))),
    "defaults": {"vcpus": 4, "mem_mib": 2048, "disk_bytes": image["size_bytes"]},
    "param_keys": re.findall(r'"([a-z0-9_]+)"', keys.group(1)),
}
with open(sys.argv[1], "w") as f:
    json.dump(manifest, f, indent=2)
    f.write("\n")
PY
	mv "$manifest.tmp" "$manifest"
}
timed "manifest" write_manifest

log "done: $kernel ($(stat -c %s "$kernel") bytes), $image ($(stat -c %s "$image") bytes, $(du -B1 "$image" | cut -f1) allocated), $manifest"
