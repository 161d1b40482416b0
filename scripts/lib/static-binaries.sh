# shellcheck shell=bash
# The two binaries that run inside microVMs, linked statically (the musl target cannot be
# installed here, so: the gnu target with crt-static). builder-agent is the builder VM's init;
# builder-init is injected into every converted rootfs and must run in any image (scratch,
# distroless, Alpine). builder-agent finds builder-init beside itself, so both live in one
# directory. Sourced by the scripts that need them; callers run `set -euo pipefail`.

STATIC_TARGET=x86_64-unknown-linux-gnu

# Builds both (incrementally) and sets STATIC_BIN_DIR to the directory holding them.
build_static_binaries() {
	local repo
	repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	(cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" \
		cargo build --release --locked -p builder-agent -p builder-init --target "$STATIC_TARGET" >&2)
	STATIC_BIN_DIR=$repo/target/$STATIC_TARGET/release
	check_static_binaries "$STATIC_BIN_DIR"
}

# Fails unless DIR holds both binaries, executable and without a program interpreter.
check_static_binaries() {
	local dir=$1 bin
	for bin in builder-agent builder-init; do
		if [ ! -x "$dir/$bin" ]; then
			echo "error: the binary $dir/$bin does not exist" >&2
			return 1
		fi
		if readelf -l "$dir/$bin" | grep -q 'program interpreter'; then
			echo "error: $dir/$bin is dynamically linked; build it with RUSTFLAGS='-C target-feature=+crt-static'" >&2
			return 1
		fi
	done
}
