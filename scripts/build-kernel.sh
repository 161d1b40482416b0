#!/usr/bin/env bash
# Builds the builder VM's guest kernel: an uncompressed ELF vmlinux (PVH entry
# point, so QEMU -M microvm and Firecracker can boot it directly) from Debian's
# linux-source-6.1 package, configured as `make allnoconfig` plus the fragments
# vm/kernel/builder.config (what a builder guest needs) and vm/kernel/hardening.config
# (hardening that costs little in a VM), and checked by scripts/check-kernel-config.sh.
#
# The result is cached under $BUILDER_VM_CACHE/kernel/<key>/ where <key> hashes
# the inputs (source package version, fragments, this script and the checker),
# so it is rebuilt only when one of them changes.
#
# Usage: scripts/build-kernel.sh [OUTPUT]     (default OUTPUT: build/vms/vmlinux)
# Environment:
#   BUILDER_VM_CACHE   cache root (default /var/cache/builder-vm)
#   KERNEL_SOURCE_PKG  Debian source package (default linux-source-6.1)
#   KERNEL_JOBS        make -j (default 2; the build runs under nice -n 19)
#   KERNEL_HARDENING   1 (default) applies vm/kernel/hardening.config; 0 leaves it out (the
#                      baseline of scripts/bench-kernel-boot.sh; cached under its own key)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
output=${1:-$repo_root/build/vms/vmlinux}
cache_root=${BUILDER_VM_CACHE:-/var/cache/builder-vm}
source_pkg=${KERNEL_SOURCE_PKG:-linux-source-6.1}
jobs=${KERNEL_JOBS:-2}
fragments=("$repo_root/vm/kernel/builder.config")
case ${KERNEL_HARDENING:-1} in
1) fragments+=("$repo_root/vm/kernel/hardening.config") ;;
0) ;;
*) printf '[build-kernel] error: KERNEL_HARDENING must be 0 or 1, not %s\n' "$KERNEL_HARDENING" >&2; exit 2 ;;
esac
checker=$repo_root/scripts/check-kernel-config.sh

log() { printf '[build-kernel] %s\n' "$*" >&2; }
die() { printf '[build-kernel] error: %s\n' "$*" >&2; exit 1; }

pkg_version=$(dpkg-query -W -f='${Status} ${Version}' "$source_pkg" 2>/dev/null | sed -n 's/^install ok installed //p')
[ -n "$pkg_version" ] || die "the Debian package $source_pkg is not installed (run: apt-get install $source_pkg bc bison flex libelf-dev libssl-dev)"
tarball=$(dpkg-query -L "$source_pkg" | grep -E '/usr/src/linux-source-[0-9.]+\.tar\.xz$' | head -n1)
[ -r "$tarball" ] || die "$source_pkg $pkg_version is installed but its source tarball is missing"
for tool in make gcc bc bison flex readelf flock; do
	command -v "$tool" >/dev/null || die "'$tool' is needed to build the kernel and is not installed"
done

key=$({
	printf '%s %s\n' "$source_pkg" "$pkg_version"
	sha256sum "${fragments[@]}" "${BASH_SOURCE[0]}" "$checker" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
cached=$cache_root/kernel/$key

# One kernel build at a time per cache (two `make builder-vm` runs share the source tree).
mkdir -p "$cache_root/kernel"
exec 9>"$cache_root/kernel/.lock"
flock 9

if [ -f "$cached/vmlinux" ]; then
	log "cached kernel $key ($source_pkg $pkg_version) found in $cached"
else
	src=$cache_root/kernel/src-$pkg_version
	if [ ! -f "$src/.extracted" ]; then
		log "extracting $tarball into $src"
		rm -rf "$src"
		mkdir -p "$src"
		tar -xJf "$tarball" -C "$src" --strip-components=1
		touch "$src/.extracted"
	fi
	log "configuring: allnoconfig + $(realpath --relative-to="$repo_root" "${fragments[@]}" | tr '\n' ' ')"
	cat "${fragments[@]}" >"$src/.builder-fragments"
	make -C "$src" -s allnoconfig KCONFIG_ALLCONFIG="$src/.builder-fragments"
	"$checker" "$src/.config" "${fragments[@]}"

	log "building vmlinux with nice -n 19 make -j$jobs (this takes a while)"
	started=$(date +%s)
	nice -n 19 make -C "$src" -s -j"$jobs" vmlinux
	seconds=$(($(date +%s) - started))
	log "kernel built in ${seconds}s"

	staging=$(mktemp -d "$cache_root/kernel/.staging.XXXXXX")
	chmod 755 "$staging"
	cp "$src/vmlinux" "$staging/vmlinux"
	cp "$src/.config" "$staging/config"
	make -C "$src" -s kernelrelease >"$staging/release"
	printf '%s %s\n' "$source_pkg" "$pkg_version" >"$staging/source"
	printf '%s\n' "$seconds" >"$staging/build-seconds"
	rm -rf "$cached"
	mv "$staging" "$cached"
fi

# QEMU and Firecracker enter an uncompressed vmlinux through its PVH note
# (XEN_ELFNOTE_PHYS32_ENTRY, type 0x12 under the owner "Xen").
readelf -h "$cached/vmlinux" | grep -q 'Class:[[:space:]]*ELF64' || die "$cached/vmlinux is not a 64-bit ELF image"
readelf -n "$cached/vmlinux" | grep -Eq '^[[:space:]]*Xen[[:space:]].*(0x00000012|PHYS32_ENTRY)' ||
	die "$cached/vmlinux has no PVH entry note (CONFIG_PVH); neither QEMU nor Firecracker can boot it"
mkdir -p "$(dirname "$output")"
cp "$cached/vmlinux" "$output.tmp"
mv "$output.tmp" "$output"
cp "$cached/config" "$(dirname "$output")/vmlinux.config"
cp "$cached/release" "$(dirname "$output")/vmlinux.release"
log "kernel $(cat "$cached/release") -> $output ($(stat -c %s "$output") bytes)"
