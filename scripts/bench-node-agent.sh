#!/usr/bin/env bash
# Benchmark of the node agent (issue 5), against a real daemon on loopback with the real VMM:
#   admission   POST /v1/builds → VMM process started (the build's `timings.admission_ms`, both
#               ends stamped by the daemon), over BENCH_BUILDS builds submitted one at a time
#               with free capacity. The "stub kernel that exits at once" is the real guest
#               kernel with a root disk that is not a filesystem: it panics at root mount and
#               `panic=-1` makes the VMM exit.
#   get         GET /v1/builds/{id} latency with wrk at ~BENCH_RATE requests/s (Debian's wrk has
#               no fixed-rate mode: BENCH_CONNECTIONS connections each wait 1000*C/RATE ms
#               between requests through wrk's `delay()` hook).
# Prints name=value lines, including admission_median_ms= (goal <= 50) and get_p99_ms= (goal
# <= 10), and where admission goes: claim_median_ms (queue and claim in the database), then
# vm_disks/network/spawn_median_ms (the VMM layer's start, from the daemon's log).
#
# Runs as root (VM network namespaces); installs what is missing (qemu-system-x86, wrk, curl,
# jq, nftables, iptables; Rust with rustup) and builds build/vms/vmlinux with
# scripts/build-kernel.sh when it is not there (cached under /var/cache/builder-vm).
# Knobs (environment): BENCH_BUILDS (50)  BENCH_RATE (500)  BENCH_CONNECTIONS (10)
#   BENCH_SECONDS (20)  PROFILE (release; or debug)  BENCH_KERNEL (build/vms/vmlinux)
#   BUILDER_VMM_ACCEL (tcg where KVM is nested)
set -euo pipefail

[ "$(id -u)" = 0 ] || { echo "bench-node-agent: run as root (VM network namespaces)" >&2; exit 1; }
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=scripts/lib/services.sh
source "$repo/scripts/lib/services.sh"
# shellcheck source=scripts/lib/toolchain.sh
source "$repo/scripts/lib/toolchain.sh"
export PATH=$PATH:/usr/sbin:/sbin
bt_ensure_commands wrk=wrk curl=curl jq=jq qemu-system-x86_64=qemu-system-x86 ip=iproute2 \
    nft=nftables iptables-restore=iptables
for tool in wrk curl jq qemu-system-x86_64; do
    command -v "$tool" >/dev/null || { echo "bench-node-agent: $tool is not installed and could not be installed" >&2; exit 1; }
done
bt_ensure_rust
builds=${BENCH_BUILDS:-50}
rate=${BENCH_RATE:-500}
connections=${BENCH_CONNECTIONS:-10}
seconds=${BENCH_SECONDS:-20}
profile=${PROFILE:-release}
kernel=${BENCH_KERNEL:-$repo/build/vms/vmlinux}
export BUILDER_VMM_ACCEL=${BUILDER_VMM_ACCEL:-tcg}
if [ ! -f "$kernel" ] && [ -z "${BENCH_KERNEL:-}" ]; then
    bt_ensure_kernel_deps
    "$repo/scripts/build-kernel.sh" "$kernel"
fi
[ -f "$kernel" ] || { echo "bench-node-agent: no guest kernel at $kernel (scripts/build-kernel.sh)" >&2; exit 1; }

log() { echo "bench-node-agent: $*" >&2; }

if [ "$profile" = release ]; then
    cargo build --release -p node-agent >&2
else
    cargo build -p node-agent >&2
fi
bin=$repo/target/$profile/node-agent

work=$(mktemp -d /var/tmp/bench-node-agent.XXXXXX)
daemon=
cleanup() {
    if [ -n "$daemon" ]; then
        kill -TERM "$daemon" 2>/dev/null || true
        wait "$daemon" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

truncate -s 1M "$work/not-a-filesystem.img"
# A build must name an S3 bucket and the node must have S3 credentials to admit it; these VMs
# panic at root mount long before any upload, so the endpoint is a closed loopback port.
cat >"$work/s3-credentials.json" <<'JSON'
{"s3": {"endpoint": "http://127.0.0.1:9", "access_key_id": "bench", "secret_access_key": "bench"}}
JSON
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
# A VM network of its own (make test-builder-vm uses 10.219/16, its hostile mode 10.216/16, node-agent's VM tests 10.218/16):
# host-side veth names derive from addresses, so daemons on one host must not share a range.
"$bin" serve --work-dir "$work/state" --listen "127.0.0.1:$port" --capacity-vcpus 2 \
    --capacity-mem-mib 4096 --kernel "$kernel" --rootfs "$work/not-a-filesystem.img" \
    --vm-network 10.217.0.0/16 --poll-interval-ms 1000 --vmm qemu \
    --s3-credentials-file "$work/s3-credentials.json" >"$work/daemon.log" 2>&1 &
daemon=$!
for _ in $(seq 100); do
    curl -fs "$base/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "$base/healthz" >/dev/null || { log "the daemon did not start:"; cat "$work/daemon.log" >&2; exit 1; }
token=$(cat "$work/state/api-token")
auth=(-H "Authorization: Bearer $token")

body='{"repo_url":"https://git.example/app.git","ref":"main","vcpus":1,"mem_mib":256,"disk_gib":1,"timeout_s":60,"s3_bucket":"bench","s3_key":"app.rootfs"}'
admissions=()
claims=()
for i in $(seq "$builds"); do
    id=$(curl -fs "${auth[@]}" -H 'content-type: application/json' -d "$body" "$base/v1/builds" | jq -r .id)
    while :; do
        view=$(curl -fs "${auth[@]}" "$base/v1/builds/$id")
        state=$(jq -r .state <<<"$view")
        case $state in succeeded|failed|timed_out|cancelled) break ;; esac
        sleep 0.05
    done
    admission=$(jq -r .timings.admission_ms <<<"$view")
    [ "$admission" != null ] || { log "build $id never started a VM: $(jq -c .error <<<"$view")"; exit 1; }
    admissions+=("$admission")
    claims+=("$(jq -r '.timings.started_at_ms - .timings.created_at_ms' <<<"$view")")
    [ $((i % 10)) = 0 ] && log "$i/$builds builds (last: $state, admission ${admission} ms, $(jq -r .error.message <<<"$view" | head -1))"
done
printf '%s\n' "${admissions[@]}" | sort -n >"$work/admissions"
printf '%s\n' "${claims[@]}" | sort -n >"$work/claims"
pick() { awk -v q="$2" '{ v[NR] = $1 } END { i = int(q * (NR - 1) + 0.5) + 1; print v[i] }' "$work/$1"; }
echo "admission_builds=$builds"
echo "admission_median_ms=$(pick admissions 0.5)"
echo "admission_p90_ms=$(pick admissions 0.9)"
echo "admission_max_ms=$(pick admissions 1)"
# The part before the VMM layer starts (queue, claim); the rest is VM setup and spawn, which
# the VMM layer's "VM started" log line splits into disks, network and the VMM spawn.
echo "claim_median_ms=$(pick claims 0.5)"
for part in disks network spawn; do
    jq -rR --arg f "${part}_ms" 'fromjson? | select(.fields.message == "VM started") | .fields[$f]' \
        "$work/daemon.log" | sort -g >"$work/$part"
    echo "vm_${part}_median_ms=$(pick "$part" 0.5)"
done

delay=$((1000 * connections / rate))
cat >"$work/get.lua" <<LUA
wrk.headers["Authorization"] = "Bearer $token"
function delay() return $delay end
LUA
log "GET /v1/builds/$id: $connections connections, ${delay} ms between requests each, ${seconds}s"
wrk -t2 -c"$connections" -d"${seconds}s" --latency -s "$work/get.lua" "$base/v1/builds/$id" >"$work/wrk.out"
cat "$work/wrk.out" >&2
ms() { # wrk prints 1.23ms / 456.00us / 1.20s
    awk -v v="$1" 'BEGIN { if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 } else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 } else { sub(/s$/, "", v); print v * 1000 } }'
}
p50=$(awk '$1 == "50%" { print $2 }' "$work/wrk.out")
p99=$(awk '$1 == "99%" { print $2 }' "$work/wrk.out")
rps=$(awk '$1 == "Requests/sec:" { print $2 }' "$work/wrk.out")
non2xx=$(awk '/Non-2xx/ { print $NF }' "$work/wrk.out")
echo "get_rate_target=$rate"
echo "get_requests_per_s=$rps"
echo "get_p50_ms=$(ms "$p50")"
echo "get_p99_ms=$(ms "$p99")"
echo "get_non_2xx=${non2xx:-0}"
