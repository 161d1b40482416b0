#!/usr/bin/env bash
# Benchmark: what the guest kernel's hardening (vm/kernel/hardening.config) costs at boot.
#
# Builds (or takes from the cache) two guest kernels from the same source and fragments, one
# with the hardening fragment and one without it (KERNEL_HARDENING=0), then boots each ROUNDS
# times, alternating, under QEMU -M microvm the way builder VMs boot (same machine, same kernel
# arguments, TCG unless BENCH_ACCEL=kvm) into a tiny root filesystem whose init prints the
# kernel's uptime and reboots. Prints the medians of both and their ratio, measured in the same
# run because these machines are noisy:
#   base_boot_s=  hardened_boot_s=  hardened_over_base=        (host wall clock, QEMU start to exit)
#   base_uptime_s=  hardened_uptime_s=  uptime_hardened_over_base= (guest clock when init ran)
#
# Usage: sudo scripts/bench-kernel-boot.sh [ROUNDS]        (default 5)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-5}
accel=${BENCH_ACCEL:-tcg}
work=$(mktemp -d /tmp/bench-kernel-boot.XXXXXX)
trap 'rm -rf "$work"' EXIT

say() { printf '[bench-kernel-boot] %s\n' "$*" >&2; }

# shellcheck source=scripts/lib/services.sh
source "$repo_root/scripts/lib/services.sh"
bt_require_root scripts/bench-kernel-boot.sh
bt_ensure_kernel_deps
bt_ensure_commands qemu-system-x86_64=qemu-system-x86 mkfs.ext4=e2fsprogs bc=bc
bt_busybox_static >/dev/null || bt_apt_install busybox-static
busybox=$(bt_busybox_static)

say "kernels: with and without vm/kernel/hardening.config (cached by input hash)"
KERNEL_HARDENING=1 "$repo_root/scripts/build-kernel.sh" "$work/hardened/vmlinux"
KERNEL_HARDENING=0 "$repo_root/scripts/build-kernel.sh" "$work/base/vmlinux"

# The root filesystem: a static busybox and an init that reports the guest's uptime.
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev"
cp "$busybox" "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
cat >"$work/root/init" <<'EOF'
#!/bin/sh
/bin/busybox mount -t proc proc /proc
read up _ </proc/uptime
echo "bench-uptime $up"
/bin/busybox reboot -f
EOF
chmod 755 "$work/root/init"
mkfs.ext4 -q -d "$work/root" "$work/root.ext4" 16M

# The builder VM's kernel arguments (builder-vmm DEFAULT_BOOT_ARGS) with this init.
args="console=ttyS0 reboot=k panic=-1 i8042.noaux i8042.nomux i8042.dumbkbd root=/dev/vda ro init=/init"
if [ "$accel" = tcg ]; then
	khz=$(awk -F': ' '/^cpu MHz/ {printf "%d", $2 * 1000; exit}' /proc/cpuinfo)
	[ -n "$khz" ] && args="$args tsc_early_khz=$khz"
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

boot() { # KERNEL -> "WALL_S UPTIME_S"
	local console=$work/console started ended
	started=$(date +%s.%N)
	timeout 120 qemu-system-x86_64 -M "microvm,accel=$accel,acpi=off" -cpu "$cpu" -m 512 -smp 1 \
		-nodefaults -no-user-config -display none -no-reboot \
		-kernel "$1" -append "$args" -serial "file:$console" \
		-drive "id=root,file=$work/root.ext4,format=raw,if=none,readonly=on" \
		-device virtio-blk-device,drive=root
	ended=$(date +%s.%N)
	local uptime
	uptime=$(sed -n 's/^bench-uptime \([0-9.]*\).*/\1/p' "$console" | head -n1)
	[ -n "$uptime" ] || { say "the guest never reached init; console:"; tail -n 20 "$console" >&2; exit 1; }
	printf '%s %s\n' "$(echo "$ended - $started" | bc)" "$uptime"
}

median() { sort -n | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

say "booting each kernel $rounds times, alternating ($accel)"
: >"$work/base.txt"
: >"$work/hardened.txt"
for round in $(seq "$rounds"); do
	for kind in base hardened; do
		result=$(boot "$work/$kind/vmlinux")
		echo "$result" >>"$work/$kind.txt"
		say "round $round $kind: wall ${result% *} s, guest uptime at init ${result#* } s"
	done
done

base_wall=$(cut -d' ' -f1 "$work/base.txt" | median)
hard_wall=$(cut -d' ' -f1 "$work/hardened.txt" | median)
base_up=$(cut -d' ' -f2 "$work/base.txt" | median)
hard_up=$(cut -d' ' -f2 "$work/hardened.txt" | median)
printf 'base_boot_s=%.3f\nhardened_boot_s=%.3f\nhardened_over_base=%.3f\n' \
	"$base_wall" "$hard_wall" "$(echo "$hard_wall / $base_wall" | bc -l)"
printf 'base_uptime_s=%.3f\nhardened_uptime_s=%.3f\nuptime_hardened_over_base=%.3f\n' \
	"$base_up" "$hard_up" "$(echo "$hard_up / $base_up" | bc -l)"
