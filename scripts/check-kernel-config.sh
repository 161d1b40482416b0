#!/usr/bin/env bash
# Checks a resolved kernel .config for everything the builder VM guest needs:
#   1. the options Docker itself lists as required (the "Generally Necessary"
#      section of moby's contrib/check-config.sh, for a 6.x kernel, plus a
#      storage driver: overlay2),
#   2. the options the builder guest relies on beyond Docker (virtio-mmio, PVH,
#      serial console, reboot=k, ip= autoconfig, nft-backed iptables, ...),
#   3. every line of the kernel config fragment(s) given, as written (=y must be
#      built in, =n must be off), so Kconfig cannot silently drop an option
#      whose dependency is missing.
# No modules exist in this kernel, so =m counts as missing.
#
# Usage: scripts/check-kernel-config.sh CONFIG [FRAGMENT...]
# Exit status: 0 when everything is present, 1 when something is missing.
set -euo pipefail

if [ $# -lt 1 ]; then
	echo "usage: $0 CONFIG [FRAGMENT...]" >&2
	exit 2
fi
config=$1
shift
if [ ! -r "$config" ]; then
	echo "error: kernel config '$config' cannot be read" >&2
	exit 2
fi

# Docker's required list (moby contrib/check-config.sh, "Generally Necessary",
# kernel >= 5.3) and the overlay storage driver.
docker_required=(
	NAMESPACES NET_NS PID_NS IPC_NS UTS_NS
	CGROUPS CGROUP_CPUACCT CGROUP_DEVICE CGROUP_FREEZER CGROUP_SCHED CPUSETS MEMCG
	KEYS
	VETH BRIDGE BRIDGE_NETFILTER
	IP_NF_FILTER IP_NF_MANGLE IP_NF_TARGET_MASQUERADE
	IP6_NF_FILTER IP6_NF_MANGLE IP6_NF_TARGET_MASQUERADE
	NETFILTER_XT_MATCH_ADDRTYPE NETFILTER_XT_MATCH_CONNTRACK NETFILTER_XT_MATCH_IPVS
	NETFILTER_XT_MARK
	IP_NF_RAW IP_NF_NAT NF_NAT
	IP6_NF_RAW IP6_NF_NAT
	POSIX_MQUEUE
	CGROUP_BPF
	OVERLAY_FS
)

# What the builder guest needs on top of Docker's list: Docker's "optional"
# features that builds use (user namespaces, seccomp, pids/io/cpu limits,
# nftables for Debian's default iptables-nft), runc's cgroup v2 device filter
# (BPF_SYSCALL), and the VM platform itself (ACPI on x86 loads no tables without PCI).
builder_required=(
	64BIT PVH KVM_GUEST ACPI PCI
	VIRTIO_MMIO VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET VSOCKETS VIRTIO_VSOCKETS
	SERIAL_8250 SERIAL_8250_CONSOLE SERIO_I8042 KEYBOARD_ATKBD
	EXT4_FS EXT4_FS_POSIX_ACL EXT4_FS_SECURITY
	DEVTMPFS DEVTMPFS_MOUNT TMPFS
	IP_PNP UNIX INET IPV6
	USER_NS SECCOMP SECCOMP_FILTER BPF_SYSCALL
	CGROUP_PIDS BLK_CGROUP BLK_DEV_THROTTLING CFS_BANDWIDTH FAIR_GROUP_SCHED
	NF_TABLES NFT_COMPAT NFT_CT NFT_NAT NFT_MASQ
	RTC_DRV_CMOS
)
builder_forbidden=(MODULES)

missing=0
value_of() {
	# Prints the option's value (y, m, a string) or nothing when it is not set.
	sed -n "s/^CONFIG_$1=//p" "$config"
}
require() {
	local option=$1 why=$2 value
	value=$(value_of "$option")
	if [ "$value" != y ]; then
		echo "missing: CONFIG_$option (${why}; found: ${value:-not set})"
		missing=$((missing + 1))
	fi
}
forbid() {
	local option=$1 why=$2 value
	value=$(value_of "$option")
	if [ -n "$value" ] && [ "$value" != n ]; then
		echo "unwanted: CONFIG_$option=$value (${why})"
		missing=$((missing + 1))
	fi
}

for option in "${docker_required[@]}"; do require "$option" "Docker requires it"; done
for option in "${builder_required[@]}"; do require "$option" "the builder guest requires it"; done
for option in "${builder_forbidden[@]}"; do forbid "$option" "the builder kernel has everything built in"; done

for fragment in "$@"; do
	if [ ! -r "$fragment" ]; then
		echo "error: kernel config fragment '$fragment' cannot be read" >&2
		exit 2
	fi
	while IFS='=' read -r option value; do
		case $value in
		y) require "${option#CONFIG_}" "set in $fragment" ;;
		n) forbid "${option#CONFIG_}" "turned off in $fragment" ;;
		esac
	done < <(grep -E '^CONFIG_[A-Z0-9_]+=[yn]$' "$fragment")
done

checked=$((${#docker_required[@]} + ${#builder_required[@]} + ${#builder_forbidden[@]}))
if [ "$missing" -gt 0 ]; then
	echo "kernel config $config: $missing problem(s) found" >&2
	exit 1
fi
echo "kernel config $config: Docker's required options, the builder guest's $checked checks and the fragment(s) all hold"
