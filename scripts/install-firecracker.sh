#!/usr/bin/env bash
# Installs a pinned Firecracker release (firecracker and jailer) from the official GitHub
# releases, after checking the tarball against the SHA-256 published next to it
# (<tarball>.sha256.txt). The VMM layer (crates/builder-vmm) finds the binaries through
# FIRECRACKER_BIN / JAILER_BIN or on PATH.
#
# The driver configures the console with the `PUT /serial` API: use a release that has it.
#
# Usage: scripts/install-firecracker.sh
# Environment:
#   FIRECRACKER_VERSION  release tag (default below)
#   PREFIX               install directory (default /usr/local/bin)
set -euo pipefail

version=${FIRECRACKER_VERSION:-v1.14.0}
prefix=${PREFIX:-/usr/local/bin}
arch=$(uname -m)
base_url="https://github.com/firecracker-microvm/firecracker/releases/download/${version}"
tarball="firecracker-${version}-${arch}.tgz"

die() {
    echo "install-firecracker: $*" >&2
    exit 1
}

for tool in curl sha256sum tar install; do
    command -v "$tool" >/dev/null || die "\`$tool\` is required but not installed"
done
case $arch in
x86_64 | aarch64) ;;
*) die "Firecracker publishes no release for $arch" ;;
esac
[[ -w $prefix || $EUID -eq 0 ]] || die "cannot write to $prefix: run as root or set PREFIX"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

fetch() {
    local url=$1 out=$2
    curl --fail --silent --show-error --location --connect-timeout 10 --retry 2 \
        --output "$out" "$url" ||
        die "cannot download $url (is this machine offline, or is GitHub unreachable from it?)"
}

echo "install-firecracker: downloading Firecracker ${version} for ${arch}" >&2
fetch "${base_url}/${tarball}.sha256.txt" "$work/${tarball}.sha256.txt"
fetch "${base_url}/${tarball}" "$work/${tarball}"

expected=$(awk 'NR == 1 { print $1 }' "$work/${tarball}.sha256.txt")
[[ $expected =~ ^[0-9a-f]{64}$ ]] || die "${tarball}.sha256.txt does not hold a SHA-256 digest"
actual=$(sha256sum "$work/${tarball}" | awk '{ print $1 }')
[[ $actual == "$expected" ]] ||
    die "checksum mismatch for ${tarball}: published ${expected}, downloaded ${actual}"

tar -xzf "$work/${tarball}" -C "$work"
release_dir="$work/release-${version}-${arch}"
for binary in firecracker jailer; do
    file="${release_dir}/${binary}-${version}-${arch}"
    [[ -f $file ]] || die "the release tarball has no ${binary}-${version}-${arch}"
    install -m 0755 "$file" "${prefix}/${binary}"
    reported=$("${prefix}/${binary}" --version 2>&1 | head -n 1)
    [[ $reported == *"${version#v}"* ]] ||
        die "${prefix}/${binary} reports \"${reported}\", not ${version}"
    echo "install-firecracker: installed ${prefix}/${binary} (${reported})" >&2
done
