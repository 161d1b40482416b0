#!/usr/bin/env bash
# The main job on its embedded defaults: on a fresh Debian 12, as root, sets up dockerd, the git
# daemon and the base image (scripts/lib/services.sh; no S3), publishes examples/hello as a git
# repository, builds builder-agent and runs one build of it into ./out/example/rootfs.ext4,
# then shows what is inside. Services it started are stopped on exit.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/lib/services.sh
source scripts/lib/toolchain.sh
bt_require_root "$0"

build_id=example
out=out/$build_id

bt_ensure_deps
bt_ensure_rust
bt_lease_take
trap bt_lease_release EXIT
bt_start_all --no-s3
eval "$(bt_env)"

# Publish the example as the branch `main` of hello.git, with a fixed author and date so its
# commit id is the same on every machine.
repo=$BUILDER_TEST_GIT_ROOT/hello.git
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"; bt_lease_release' EXIT
cp -a examples/hello "$scratch/src"
(
	cd "$scratch/src"
	export GIT_AUTHOR_NAME=builder-vm GIT_AUTHOR_EMAIL=example@builder-vm.invalid
	export GIT_COMMITTER_NAME=builder-vm GIT_COMMITTER_EMAIL=example@builder-vm.invalid
	export GIT_AUTHOR_DATE=2026-01-01T00:00:00Z GIT_COMMITTER_DATE=2026-01-01T00:00:00Z
	git init -q -b main
	git add -A
	git commit -q -m "The builder-vm example app"
)
rm -rf "$repo"
git clone -q --bare "$scratch/src" "$repo"
echo "== example repository: $BUILDER_TEST_GIT_URL/hello.git at $(git -C "$repo" rev-parse main)"

echo "== cargo build (static builder-agent and builder-init, the init injected into the rootfs)"
source scripts/lib/static-binaries.sh
build_static_binaries

rm -rf "$out"
mkdir -p "$out"
echo "== builder-agent run"
status=0
"$STATIC_BIN_DIR/builder-agent" run \
	--params "repo_url=$BUILDER_TEST_GIT_URL/hello.git commit_sha=main build_id=$build_id" \
	--out-dir ./out --work-dir "$scratch/work" --log-file "./$out/build.log" \
	>"$out/report.json" || status=$?
if ((status != 0)); then
	echo "builder-agent failed (exit $status); its report: ./$out/report.json, its log: ./$out/build.log" >&2
	exit "$status"
fi

echo
echo "== the root filesystem, its image config (rootfs.json), the build report and log"
ls -l "$out"
cat "$out/rootfs.json"
echo
echo "== debugfs -R 'ls -l /app' $out/rootfs.ext4"
debugfs -R 'ls -l /app' "$out/rootfs.ext4" 2>/dev/null
echo "== debugfs -R 'cat /app/motd.txt' $out/rootfs.ext4"
debugfs -R 'cat /app/motd.txt' "$out/rootfs.ext4" 2>/dev/null
echo "== debugfs -R 'ls -l /.builder-vm' $out/rootfs.ext4 (what makes it bootable: init=/.builder-vm/init)"
debugfs -R 'ls -l /.builder-vm' "$out/rootfs.ext4" 2>/dev/null
echo
echo "Mount it read-only to look around: mount -o loop,ro $out/rootfs.ext4 /mnt"
