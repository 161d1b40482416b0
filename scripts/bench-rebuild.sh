#!/usr/bin/env bash
# Benchmark of warm builds (issue 10): through `node-agent serve` and real builder VMs, builds a
# git copy of examples/rebuild (a slow dependency step, then a late COPY of the app) three times
# with one cache key (`node-agent submit DIR`: `dir:<path>` of the token's tenant):
#   cold    a new cache key: an empty cache disk, every step runs;
#   warm    after a one-line change to app/version.sh (a new commit): the key's cache disk has
#           every layer up to the COPY;
#   noop    the same commit again: the same image, so no convert or upload (`rootfs.reused`).
# Prints name=value lines: cold_build_s, warm_build_s, noop_build_s (the `build` phase from the
# reports), cold_total_s, warm_total_s, noop_total_s (submit → final state), the ratios
# warm_over_cold_build (goal <= 0.1) and warm_over_cold_total (goal <= 0.5), noop_reused, the
# cache's fork and commit costs (the builds' events, the node's node_agent_cache_* metrics),
# and the warm build's breakdown (warm_*_s: admission, kernel boot to init, filesystems,
# dockerd start, each phase, the rest: VM shutdown and the report), then whether the goals are
# met. Exits non-zero when a build fails, zero when only a goal is missed.
#
# Runs as root (VM network namespaces). Sets up what it needs: the test services (dockerd with
# the base image), build/vms with that image preloaded (scripts/build-builder-vm.sh, a stamped
# rebuild), its own outside namespace with SeaweedFS S3 (scripts/lib/outside.sh, 198.18.252.0/30)
# and its own node agent (VM network 10.220.0.0/16), all removed at the end.
# Knobs (environment): BENCH_DEPS_ROUNDS (the example's DEPS_ROUNDS, 64 MiB hashed per round;
#   default the Dockerfile's)  BENCH_VCPUS (2)  PROFILE (release; or debug)
#   BUILDER_VMM_ACCEL (tcg where KVM is nested)  KEEP_WORK=1 keeps the work dir
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
# shellcheck source=scripts/lib/services.sh
source scripts/lib/services.sh
bt_require_root "$0"
export PATH=$PATH:/usr/sbin:/sbin
if [[ -z ${BUILDER_VMM_ACCEL:-} ]] && grep -qw hypervisor /proc/cpuinfo; then
	export BUILDER_VMM_ACCEL=tcg # KVM here is nested: it "works" but crawls
fi
profile=${PROFILE:-release}
vcpus=${BENCH_VCPUS:-2}
log() { echo "bench-rebuild: $*" >&2; }
die() {
	log "FAILED: $*"
	exit 1
}

work=$(mktemp -d /var/tmp/bench-rebuild.XXXXXX)
daemon_pid=
cleanup() {
	local status=$?
	set +e
	if [[ -n $daemon_pid ]]; then
		kill -TERM "$daemon_pid" 2>/dev/null
		wait "$daemon_pid" 2>/dev/null
	fi
	scripts/lib/outside.sh down "$work/outside"
	bt_lease_release
	if [[ ${KEEP_WORK:-} == 1 || $status -ne 0 ]]; then
		log "work dir kept: $work"
	else
		rm -rf "$work"
	fi
	exit "$status"
}
bt_ensure_deps
bt_lease_take
trap cleanup EXIT

log "builder image: scripts/build-builder-vm.sh with the base image preloaded"
bt_build_builder_vm_with_base_image "$work/builder-vm.log" ||
	die "scripts/build-builder-vm.sh failed (log: $work/builder-vm.log)"
if [[ $profile == release ]]; then cargo build --release -q -p node-agent; else cargo build -q -p node-agent; fi
node_agent=$repo/target/$profile/node-agent

log "outside namespace: SeaweedFS S3"
scripts/lib/outside.sh up "$work/outside" bvr-out 252
# shellcheck disable=SC1091
source "$work/outside/outside.env"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
server=(--server "http://127.0.0.1:$port" --token-file "$work/node/api-token")
mkdir -p "$work/node"
"$node_agent" serve --work-dir "$work/node" --listen "127.0.0.1:$port" --node-id bench-rebuild \
	--capacity-vcpus "$vcpus" --capacity-mem-mib 4096 --vmm qemu --kernel build/vms/vmlinux \
	--rootfs build/vms/builder-rootfs.ext4 --vm-network 10.220.0.0/16 --vm-dns "$OUTSIDE_ADDR" \
	--s3-credentials-file "$work/outside/s3-credentials.json" --grace-period-s 5 \
	>"$work/daemon.log" 2>&1 &
daemon_pid=$!
for _ in $(seq 300); do
	curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 && break
	kill -0 "$daemon_pid" 2>/dev/null || die "node-agent serve exited: $(tail -n 5 "$work/daemon.log")"
	sleep 0.1
done
curl -fs "http://127.0.0.1:$port/healthz" >/dev/null || die "node-agent serve did not come up (log: $work/daemon.log)"

# The app: a git work tree, so each build is of its committed state.
cp -r examples/rebuild "$work/app"
git -C "$work/app" init -q -b main
git -C "$work/app" -c user.name=bench -c user.email=bench@localhost commit -q --allow-empty -m init
git -C "$work/app" add -A
git -C "$work/app" -c user.name=bench -c user.email=bench@localhost commit -q -m "rebuild example"
build_args=()
[[ -z ${BENCH_DEPS_ROUNDS:-} ]] || build_args=(--build-arg "DEPS_ROUNDS=$BENCH_DEPS_ROUNDS")

# build NAME: submits the app, waits for its end; $work/NAME.json is the build view, NAME_total_ms
# the time from submit to the final state.
now_ms() { date +%s%3N; }
declare -A total_ms=()
build() {
	local name=$1 start id status=0
	log "$name build"
	start=$(now_ms)
	"$node_agent" submit "$work/app" "${server[@]}" "${build_args[@]}" --s3-bucket "$S3_BUCKET" \
		--s3-key bench-rebuild/app.ext4 --vcpus "$vcpus" --mem-mib 2048 --disk-gib 4 \
		--timeout-s 900 --wait >"$work/$name.out" 2>"$work/$name.log" || status=$?
	total_ms[$name]=$(($(now_ms) - start))
	id=$(head -n1 "$work/$name.out")
	[[ $id =~ ^[A-Za-z0-9_-]+$ ]] || die "$name: node-agent submit printed no build id: $(tail -n 5 "$work/$name.log")"
	"$node_agent" status "$id" --json "${server[@]}" >"$work/$name.json"
	"$node_agent" logs "$id" --source console "${server[@]}" >"$work/$name.console" || true
	((status == 0)) && [[ $(jq -r .state "$work/$name.json") == succeeded ]] ||
		die "the $name build $(jq -r .state "$work/$name.json"): $(jq -c .error "$work/$name.json") (log: $work/$name.log)"
}
build cold
sed -i 's/^APP_VERSION=.*/APP_VERSION=2/' "$work/app/app/version.sh"
git -C "$work/app" -c user.name=bench -c user.email=bench@localhost commit -q -am "app: version 2"
build warm
build noop

secs() { awk -v ms="$1" 'BEGIN { printf "%.1f", ms / 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0 ? a / b : 0) }'; }
phase_ms() { jq -r --arg p "$2" '[.timings.phases[] | select(.phase == $p) | .duration_ms] | add // 0' "$work/$1.json"; }
for name in cold warm noop; do
	echo "${name}_build_s=$(secs "$(phase_ms "$name" build)")"
done
for name in cold warm noop; do
	echo "${name}_total_s=$(secs "${total_ms[$name]}")"
done
build_ratio=$(ratio "$(phase_ms warm build)" "$(phase_ms cold build)")
total_ratio=$(ratio "${total_ms[warm]}" "${total_ms[cold]}")
echo "warm_over_cold_build=$build_ratio"
echo "warm_over_cold_total=$total_ratio"
echo "noop_reused=$(jq -r '.rootfs.reused // false' "$work/noop.json")"
echo "noop_same_sha256=$(jq -rn --slurpfile w "$work/warm.json" --slurpfile n "$work/noop.json" \
	'$w[0].rootfs.sha256 == $n[0].rootfs.sha256')"
for name in cold warm noop; do
	echo "${name}_cache=$(jq -r '.cache.outcome // "-"' "$work/$name.json")"
done

# The cache's costs: each build's fork (at its start) and commit (at its end), from the events
# the node recorded for it, and the node's cache metrics.
event_ms() { # event_ms NAME REGEX: the milliseconds the first event of build NAME matching REGEX names
	jq -r --arg re "$2" '[.events // [] | .[] | .detail // "" | capture($re)? | .ms] | first // "-"' "$work/$1.json"
}
for name in cold warm noop; do
	echo "${name}_cache_fork_ms=$(event_ms "$name" 'build cache .*forked .* in (?<ms>[0-9]+) ms')"
	echo "${name}_cache_commit_ms=$(event_ms "$name" 'build cache committed in (?<ms>[0-9]+) ms')"
done
curl -fs -H "Authorization: Bearer $(cat "$work/node/api-token")" "http://127.0.0.1:$port/metrics" |
	grep '^node_agent_cache_' | grep -v '_bucket{' | sed 's/^/metric /' || true

# Where the warm build's time goes: the client (bundling and uploading the source, following
# the build to its end), admission (created → VMM started), and inside the VM the guest
# kernel's boot to init, the agent's filesystems and dockerd start, each phase of the report,
# the guest's end, and the VM's time outside its kernel's clock.
warm_console=$work/warm.console
console_ms() { grep -o "$1 [0-9]* ms" "$warm_console" | head -n1 | grep -o '[0-9]*' || echo 0; }
timing() { jq -r ".timings.$1 // 0" "$work/warm.json"; }
created=$(timing created_at_ms)
vm_started=$(timing vm_started_at_ms)
finished=$(timing finished_at_ms)
init_ms=$(grep -o '\[ *[0-9.]*\] Run [^ ]* as init process' "$warm_console" | head -n1 |
	sed 's/^\[ *\([0-9.]*\)\].*/\1/' | awk '{ printf "%d", $1 * 1000 }')
init_ms=${init_ms:-0}
filesystems=$(console_ms "filesystems ready in")
dockerd=$(console_ms "dockerd ready in")
echo "warm_client_s=$(secs $((total_ms[warm] - (finished - created))))"
echo "warm_admission_s=$(secs $((vm_started - created)))"
echo "warm_kernel_to_init_s=$(secs "$init_ms")"
echo "warm_filesystems_s=$(secs "$filesystems")"
echo "warm_dockerd_start_s=$(secs "$dockerd")"
in_vm=$((init_ms + filesystems + dockerd))
for phase in $(jq -r '.timings.phases[].phase' "$work/warm.json"); do
	ms=$(phase_ms warm "$phase")
	echo "warm_phase_${phase}_s=$(secs "$ms")"
	in_vm=$((in_vm + ms))
done
# The guest kernel's clock at power off splits the rest: the guest's end (image prune, dockerd
# stop, unmounts) and what lies outside the kernel's clock (QEMU's start and firmware, the
# node's handling of the VMM's exit).
uptime_ms=$(grep -o '\[ *[0-9.]*\] reboot: Restarting system' "$warm_console" | tail -n1 |
	sed 's/^\[ *\([0-9.]*\)\].*/\1/' | awk '{ printf "%d", $1 * 1000 }')
uptime_ms=${uptime_ms:-0}
echo "warm_guest_end_s=$(secs $((uptime_ms - in_vm)))"
echo "warm_outside_kernel_s=$(secs $((finished - vm_started - uptime_ms)))"

goals=met
awk -v r="$build_ratio" 'BEGIN { exit !(r <= 0.1) }' || goals=missed
awk -v r="$total_ratio" 'BEGIN { exit !(r <= 0.5) }' || goals=missed
echo "goals=$goals (warm_over_cold_build <= 0.1: $build_ratio, warm_over_cold_total <= 0.5: $total_ratio)"
