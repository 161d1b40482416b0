#!/usr/bin/env bash
# The one test command (what CI runs, through .ci/run): on a fresh Debian 12, as root, installs
# what is missing, starts the test services (scripts/lib/services.sh), builds every target of the
# workspace and runs every test against the real components. Exits non-zero on any failure.
# Services it started are stopped on exit; ones already running (scripts/services.sh start, or a
# concurrent run) are left as they were.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib/services.sh
source scripts/lib/toolchain.sh
bt_require_root "$0"

started=$SECONDS

bt_ensure_deps
bt_ensure_rust
# The guest kernel the VM tests boot, built from Debian's kernel source; scripts/build-kernel.sh
# caches it by its inputs under /var/cache/builder-vm, so only the first run pays for it.
bt_ensure_kernel_deps
scripts/build-kernel.sh
bt_lease_take
trap bt_lease_release EXIT
bt_start_all --with-s3
eval "$(bt_env)"
# Firecracker and its jailer: from the environment, else where CI keeps them beside the checkout.
for bin in firecracker jailer; do
	var=${bin^^}_BIN
	if [[ -z ${!var:-} && -x ../shared/bin/$bin ]]; then export "$var=$(realpath "../shared/bin/$bin")"; fi
done
# The static init the converter injects (the debug builder-init is dynamically linked).
source scripts/lib/static-binaries.sh
build_static_binaries
export BUILDER_INIT=$STATIC_BIN_DIR/builder-init
# This machine's /dev/kvm is nested and crawls: VM tests run QEMU under TCG unless told otherwise.
export BUILDER_VMM_ACCEL=${BUILDER_VMM_ACCEL:-tcg}
setup_time=$((SECONDS - started)) started=$SECONDS

echo "== cargo build --workspace --all-targets"
cargo build --workspace --all-targets --locked
# The code checks CI does not forgive: formatting and every clippy warning.
echo "== cargo fmt --check, cargo clippy -D warnings"
bt_ensure_rust_components rustfmt clippy
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
build_time=$((SECONDS - started)) started=$SECONDS

echo "== cargo test --workspace"
mkdir -p target
log=target/test-output.log
status=0
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log" || status=$?
test_time=$((SECONDS - started))

count() { awk -v what="$1" '/^test result:/ { for (i = 1; i < NF; i++) if ($(i + 1) ~ "^" what) n += $i } END { print n + 0 }' "$log"; }
echo
echo "== summary"
echo "setup  ${setup_time}s (packages, guest kernel, dockerd, SeaweedFS S3, git daemon, base image)"
echo "build  ${build_time}s (cargo build, fmt --check, clippy -D warnings)"
echo "tests  ${test_time}s: $(count passed) passed, $(count failed) failed, $(count ignored) ignored (log: $log)"
if ((status != 0)); then
	grep -E '^test .* FAILED$|^error: |^    `' "$log" | sed 's/^/  /' || true
	echo "RESULT: FAIL (exit $status)"
	exit "$status"
fi
echo "RESULT: PASS"
