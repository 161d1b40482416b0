# shellcheck shell=bash
# The Rust toolchain the workspace builds with (rust-version in Cargo.toml), found where rustup
# puts it even when sudo has reset PATH, installed with rustup when absent. Needs bt_log/bt_die
# and bt_apt_install from services.sh.

bt_ensure_rust() {
	export PATH=$PATH:$HOME/.cargo/bin:/root/.cargo/bin
	command -v cc >/dev/null || bt_apt_install gcc libc6-dev
	command -v cargo >/dev/null && return 0
	bt_log "no cargo found: installing the stable Rust toolchain with rustup"
	curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal ||
		bt_die "cannot install Rust: install a toolchain >= the workspace's rust-version with rustup"
	export PATH=$PATH:$HOME/.cargo/bin
}

# Installs the rustup components named (rustfmt, clippy) when the toolchain lacks them.
bt_ensure_rust_components() {
	local component missing=()
	for component in "$@"; do
		case $component in
		rustfmt) cargo fmt --version >/dev/null 2>&1 || missing+=("$component") ;;
		clippy) cargo clippy --version >/dev/null 2>&1 || missing+=("$component") ;;
		*) bt_die "bt_ensure_rust_components: unknown component $component" ;;
		esac
	done
	((${#missing[@]} == 0)) && return 0
	command -v rustup >/dev/null || bt_die "cargo lacks ${missing[*]} and there is no rustup to add them"
	bt_log "rustup component add ${missing[*]}"
	rustup component add "${missing[@]}"
}

# The release binary of package $2 at $1 (a benchmark's own BUILDER_AGENT may be given):
# built from the checkout at $3 when it is not there yet.
bt_ensure_release_binary() {
	local bin=$1 package=$2 repo=$3
	[ -x "$bin" ] && return 0
	bt_ensure_rust
	bt_log "building $bin"
	(cd "$repo" && cargo build --release -p "$package" >&2)
}
