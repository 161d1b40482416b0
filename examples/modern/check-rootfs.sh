#!/usr/bin/env bash
# Checks the rootfs built from examples/modern file by file (make test-builder-vm-modern runs it):
# what each Dockerfile feature must leave in the image, with its mode, and what it must not.
# Usage: check-rootfs.sh ROOTFS.ext4 [SECRET_VALUE]
set -euo pipefail
rootfs=$1 secret=${2:-}
failures=0
fail() {
	printf 'check-rootfs: %s\n' "$*" >&2
	failures=$((failures + 1))
}
cat_file() { debugfs -R "cat $1" "$rootfs" 2>/dev/null; }
exists() { debugfs -R "stat $1" "$rootfs" 2>&1 | grep -q '^Inode:'; }
mode() { debugfs -R "stat $1" "$rootfs" 2>/dev/null | sed -n 's/.*Mode: *\([0-7]*\).*/\1/p'; }
expect() { # expect PATH CONTENT [MODE]
	local got
	got=$(cat_file "$1") || true
	[[ $got == "$2" ]] || fail "$1 holds '$got', expected '$2'"
	if [[ -n ${3:-} ]]; then
		[[ $(mode "$1") == "$3" ]] || fail "$1 has mode $(mode "$1"), expected $3"
	fi
}
absent() { ! exists "$1" || fail "$1 must not be in the image ($2)"; }

expect /app/deps/fetched.txt "fetched at build time"
absent /var/cache/deps/fetched "a cache mount's contents stay out"
expect /app/app.conf $'# Rendered at build time through a bind mount of the context; this template never enters the image.\nversion = 1.2.3'
absent /mnt/config/app.conf.in "a bind mount's files stay out"
absent /app/config "the template directory is not copied"
absent /run/secrets/app_token "a secret mount stays out"
[[ -z $secret ]] || expect /app/token-length "${#secret}"
expect /app/tmpfs-was-writable scratch
absent /tmp/work/file "a tmpfs mount's contents stay out"
expect /app/platform.txt "linux/amd64 amd64 linux/amd64"
expect /app/version.txt 1.2.3
expect /app/start.sh $'#!/bin/sh\necho "modern example, version $(cat /app/version.txt)"' 0755
expect /app/static/index.html $'<!doctype html>\n<title>modern example</title>\n<p>Built by builder-vm with BuildKit.</p>' 0644
expect /app/static/asset.txt "asset fetched by ADD --checksum from a URL"
absent /app/served "served/ is left out by .dockerignore"
config=$(cat_file /.builder-vm/config.json)
[[ $(jq -r .User <<<"$config") == app ]] || fail "the image user is not app: $config"
[[ $(jq -c .Entrypoint <<<"$config") == '["/app/start.sh"]' ]] || fail "the entrypoint is not /app/start.sh: $config"
if [[ -n $secret ]] && grep -qaF -- "$secret" "$rootfs"; then
	fail "the build secret's value is somewhere in the rootfs"
fi
((failures == 0)) || exit 1
echo "check-rootfs: every file as expected ($rootfs)"
