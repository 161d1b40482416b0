#!/usr/bin/env bash
# Boots the artifacts of `make builder-vm` under QEMU -M microvm and checks that the guest is
# usable for builds: the kernel reaches init from /dev/vda, cgroup v2 and the network come up,
# dockerd starts, a container runs (runc, namespaces, cgroup v2 device filter, overlay2, bridge
# + iptables NAT), `docker buildx build` (BuildKit in dockerd, the docker driver) builds a
# Dockerfile with heredocs and a RUN --mount=type=cache whose cache a second build finds (with a
# RUN --mount=type=secret), and
# `reboot=k` makes QEMU exit.
#
# The image itself is not modified: the test runs on a sparse copy into which a test init
# script is written with debugfs, and the kernel is started with init=/smoke-init instead of
# builder-agent. Like builder-agent, the init keeps the root filesystem read-only and puts
# Docker's state on a scratch disk (/dev/vdb). Prints host-side wall-clock times per milestone.
#
# Usage: scripts/smoke-builder-vm.sh [VM_DIR]          (default VM_DIR: build/vms)
# Environment: SMOKE_ACCEL (tcg or kvm, default tcg), SMOKE_SMP (1),
#              SMOKE_MEM_MIB (1024), SMOKE_TIMEOUT_S (600), SMOKE_ACPI (on|off, default on:
#              virtio-mmio devices found through ACPI; off: through virtio_mmio.device= on the
#              command line, which QEMU then appends), SMOKE_KEEP=1 keeps the work directory.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vm_dir=${1:-$repo_root/build/vms}
kernel=$vm_dir/vmlinux
image=$vm_dir/builder-rootfs.ext4
smp=${SMOKE_SMP:-1}
mem=${SMOKE_MEM_MIB:-1024}
timeout_s=${SMOKE_TIMEOUT_S:-600}
acpi=${SMOKE_ACPI:-on}

die() { printf '[smoke] error: %s\n' "$*" >&2; exit 1; }
for file in "$kernel" "$image"; do
	[ -r "$file" ] || die "$file is missing; run 'make builder-vm' first"
done
for tool in qemu-system-x86_64 debugfs mkfs.ext4 python3 bc; do
	command -v "$tool" >/dev/null || die "'$tool' is needed and is not installed"
done

accel=${SMOKE_ACCEL:-tcg}
if [ "$accel" = tcg ]; then
	# Under TCG the guest TSC runs at the host's rate, but the kernel cannot calibrate it.
	tsc_khz=$(awk -F: '/^cpu MHz/ { printf "%d", $2 * 1000; exit }' /proc/cpuinfo)
	cpu="-accel tcg -cpu max"
	extra_args="tsc_early_khz=$tsc_khz"
else
	cpu="-accel kvm -cpu host"
	extra_args=""
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/builder-vm-smoke.XXXXXX")
cleanup() {
	if [ "${SMOKE_KEEP:-0}" = 1 ]; then
		echo "[smoke] work directory kept: $work" >&2
	else
		rm -rf "$work"
	fi
}
trap cleanup EXIT

cat >"$work/smoke-init" <<'INIT'
#!/bin/sh
# pid 1 inside the guest: the same setup builder-agent does, then a container and a build.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mark() { echo "SMOKE $1 uptime=$(cut -d' ' -f1 /proc/uptime)"; }
fail() { echo "SMOKE-FAIL $1"; [ -f /run/dockerd.log ] && tail -n 30 /run/dockerd.log; poweroff_now; exit 1; }
poweroff_now() { sync; umount /var/lib/docker /var/lib/containerd /var/log /var/tmp /mnt/scratch 2>/dev/null; python3 -c 'import ctypes; ctypes.CDLL(None).reboot(0x01234567)'; }
mount -t proc proc /proc
mark init-start
mount -t sysfs sysfs /sys
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
# The root filesystem is read-only; Docker's state goes to the scratch disk, as with builder-agent.
mount -o noatime /dev/vdb /mnt/scratch || fail "cannot mount the scratch disk"
for pair in docker:/var/lib/docker containerd:/var/lib/containerd log:/var/log tmp:/var/tmp; do
	mkdir -p "/mnt/scratch/${pair%%:*}"
	mount --bind "/mnt/scratch/${pair%%:*}" "${pair#*:}" || fail "cannot bind ${pair#*:}"
done
cat /proc/net/pnp >/run/resolv.conf
ip link set lo up
hostname "$(cat /etc/hostname)"
touch /probe 2>/dev/null && fail "the root filesystem is writable"
echo "SMOKE cgroup-controllers $(cat /sys/fs/cgroup/cgroup.controllers)"
echo "SMOKE resolv $(grep -m1 nameserver /etc/resolv.conf || echo none)"
ip -4 -o addr show dev eth0 | sed 's/^/SMOKE eth0 /' || fail "eth0 has no address"
mark mounts-done
dockerd --host unix:///run/docker.sock --data-root /var/lib/docker --exec-root /run/docker \
	--pidfile /run/docker.pid >/run/dockerd.log 2>&1 &
dockerd_pid=$!
export DOCKER_HOST=unix:///run/docker.sock
deadline=$(($(cut -d. -f1 /proc/uptime) + 300))
until docker info >/dev/null 2>&1; do
	kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd exited"
	[ "$(cut -d. -f1 /proc/uptime)" -lt "$deadline" ] || fail "dockerd did not answer within 300 s"
	sleep 0.5
done
mark dockerd-ready
echo "SMOKE docker $(docker info --format '{{.ServerVersion}} driver={{.Driver}} cgroup={{.CgroupDriver}}/v{{.CgroupVersion}}')"
echo "SMOKE docker-warnings $(docker info --format '{{join .Warnings "; "}}' 2>&1)"
echo "SMOKE buildx $(docker buildx version 2>&1)"
echo "SMOKE containerd $(containerd --version 2>&1 | cut -d' ' -f3) runc $(runc --version 2>&1 | head -n1 | cut -d' ' -f3)"
# A minimal image from the guest's own dash and libc: no registry is needed. bin/sh (dash) is
# the shell BuildKit runs heredoc RUN steps with.
tar -ch -C / bin/sh bin/dash lib64/ld-linux-x86-64.so.2 lib/x86_64-linux-gnu/libc.so.6 2>/dev/null |
	docker import - smoke:base >/dev/null || fail "docker import failed"
out=$(docker run --rm smoke:base /bin/dash -c 'echo container-ran') || fail "docker run failed"
echo "SMOKE run $out"
mark container-done
# BuildKit through buildx (docker driver), as builder-agent builds: heredocs (COPY and RUN) and a
# cache mount, then a second build that must find what the first left in that cache. The
# Dockerfile frontend is the one built into dockerd (no `# syntax=` image to pull).
mkdir -p /tmp/ctx
cat >/tmp/ctx/Dockerfile <<'DOCKERFILE'
FROM smoke:base
COPY <<'TEXT' /greeting
built by buildkit
TEXT
RUN --mount=type=cache,target=/cache,id=smoke <<'SCRIPT'
read line < /greeting
echo "$line" > /built
echo "$line" > /cache/marker
SCRIPT
DOCKERFILE
# The CLI keeps buildx state under $DOCKER_CONFIG (default ~/.docker), and / is read-only here
# as for builder-agent: tried once as it is, to say whether that matters.
if out=$(docker buildx build --progress=plain -t smoke:probe /tmp/ctx 2>&1); then
	echo "SMOKE buildx with a read-only ~/.docker: works"
else
	echo "SMOKE buildx with a read-only ~/.docker: fails: $(echo "$out" | tail -n 1)"
fi
export DOCKER_CONFIG=/run/docker-cli
mkdir -p "$DOCKER_CONFIG"
docker buildx build --progress=plain -t smoke:built /tmp/ctx >/run/buildx.log 2>&1 ||
	{ tail -n 30 /run/buildx.log; fail "docker buildx build (heredocs, cache mount) failed"; }
out=$(docker run --rm smoke:built /bin/dash -c 'read x < /built; echo $x') || fail "running the built image failed"
[ "$out" = "built by buildkit" ] || fail "the built image holds '$out'"
echo "SMOKE build $out"
mark build-done
# ... and a build secret, which must be readable in the step and absent from the image.
cat >/tmp/ctx/Dockerfile <<'DOCKERFILE'
FROM smoke:base
RUN --mount=type=cache,target=/cache,id=smoke --mount=type=secret,id=token <<'SCRIPT'
read line < /cache/marker
read secret < /run/secrets/token
[ "$secret" = smoke-secret ] && echo "$line" > /seen
SCRIPT
DOCKERFILE
echo smoke-secret >/run/smoke-secret
docker buildx build --progress=plain --secret id=token,src=/run/smoke-secret -t smoke:cached /tmp/ctx \
	>/run/buildx.log 2>&1 ||
	{ tail -n 30 /run/buildx.log; fail "the second docker buildx build (reading the cache mount) failed"; }
out=$(docker run --rm smoke:cached /bin/dash -c 'read x < /seen; echo $x') || fail "running the second image failed"
[ "$out" = "built by buildkit" ] || fail "the cache mount or the secret did not reach the step ('$out')"
docker run --rm smoke:cached /bin/dash -c 'read x < /run/secrets/token' 2>/dev/null && fail "the build secret is in the image"
echo "SMOKE cache-mount and secret $out"
mark cache-build-done
echo SMOKE-OK
poweroff_now
INIT

echo "[smoke] copying $image (sparse)" >&2
cp --sparse=always "$image" "$work/rootfs.ext4"
truncate -s 4G "$work/scratch.ext4"
mkfs.ext4 -q -F -m 0 -L scratch "$work/scratch.ext4"
debugfs -w -R "write $work/smoke-init smoke-init" "$work/rootfs.ext4" >/dev/null 2>&1
debugfs -w -R "sif smoke-init mode 0100755" "$work/rootfs.ext4" >/dev/null 2>&1
debugfs -R "stat smoke-init" "$work/rootfs.ext4" 2>/dev/null | grep -q 'Mode:  0755' ||
	die "could not write the test init into the image copy"

append="console=ttyS0 reboot=k panic=1 pci=off root=/dev/vda ro init=/smoke-init $extra_args"
append="$append ip=10.0.2.15::10.0.2.2:255.255.255.0:builder:eth0:off:10.0.2.3"
echo "[smoke] booting ($accel, $smp vCPU, $mem MiB, acpi=$acpi): $append" >&2
started=$(date +%s.%N)
set +e
# shellcheck disable=SC2086 # $cpu is two options
timeout "$timeout_s" qemu-system-x86_64 \
	-M "microvm,x-option-roms=off,isa-serial=on,rtc=on,acpi=$acpi" $cpu -smp "$smp" -m "$mem" \
	-no-reboot -nographic -no-user-config -nodefaults -serial stdio \
	-kernel "$kernel" -append "$append" \
	-drive "id=root,file=$work/rootfs.ext4,format=raw,if=none,cache=unsafe" \
	-device virtio-blk-device,drive=root \
	-drive "id=scratch,file=$work/scratch.ext4,format=raw,if=none,cache=unsafe" \
	-device virtio-blk-device,drive=scratch \
	-netdev user,id=net0 -device virtio-net-device,netdev=net0 </dev/null 2>&1 |
	while IFS= read -r line; do
		printf '%7.2f %s\n' "$(echo "$(date +%s.%N) - $started" | bc)" "${line%$'\r'}"
	done >"$work/console.log"
status=${PIPESTATUS[0]}
set -e
total=$(echo "$(date +%s.%N) - $started" | bc)
cp "$work/console.log" "$vm_dir/smoke-console.log"

at() { awk -v pat="$1" 'index($0, pat) { print $1; exit }' "$work/console.log"; }
echo "[smoke] console log: $vm_dir/smoke-console.log" >&2
printf '[smoke] %-28s %s s\n' \
	"kernel reaches init" "$(at 'Run /smoke-init')" \
	"mounts done" "$(at 'SMOKE mounts-done')" \
	"dockerd ready" "$(at 'SMOKE dockerd-ready')" \
	"container ran" "$(at 'SMOKE container-done')" \
	"buildx build done" "$(at 'SMOKE build-done')" \
	"second build (cache, secret)" "$(at 'SMOKE cache-build-done')" \
	"QEMU exited" "$(printf '%.2f' "$total")" >&2
grep '^ *[0-9.]* SMOKE ' "$work/console.log" | sed 's/^ *[0-9.]* /[smoke]   /' >&2

if [ "$status" -ne 0 ]; then
	die "QEMU did not exit by itself (status $status; 124 = timed out after ${timeout_s}s): reboot=k or the guest failed"
fi
grep -q 'SMOKE-OK' "$work/console.log" || die "the guest did not finish the checks (see $vm_dir/smoke-console.log)"
echo "[smoke] ok: the guest booted, ran dockerd, a container and two buildx builds (heredocs, cache mount, secret), and QEMU exited on reboot" >&2
