#!/usr/bin/env bash
# End-to-end test of the builder VM: boots build/vms/ (make builder-vm) through the real node
# agent and builds a real repository inside it: clone → build → convert → upload → webhook →
# the VM powers itself off.
#
# Usage: sudo scripts/test-builder-vm.sh [OPTIONS] REPO [REF [DOCKERFILE]]
#   REPO   a local directory, submitted as `node-agent submit DIR --wait` does it: the CLI
#          uploads the directory's committed state (any directory outside git: as it is) and
#          the node agent serves it to the VM over HTTP; or a git URL the VM can reach.
#   REF    branch or tag to build (a git URL only; ignored for a directory).
#   --expect-user-error  succeed only when the build fails for the user's reasons (a failing
#          Dockerfile) and the VM still shut itself down.
#   --submit-arg ARG     pass ARG to `node-agent submit` (repeatable); `{served}` in it becomes
#          the URL of --serve's directory.
#   --serve DIR          serve DIR over HTTP from the outside namespace (http://198.18.251.2:8091/).
#   --secret ID          make a random build secret ID, submit it, and check that its value is
#          nowhere after the build: not in the rootfs, the webhook, the node's database, logs or
#          console log.
#   --check CMD          after the rootfs is read back from S3: run CMD ROOTFS [SECRET_VALUE].
#   --hostile            REPO is examples/hostile: build it beside another tenant's build, attack
#          targets of its own, and check from the outside (scripts/lib/hostile.sh).
# Environment: VMM=firecracker|qemu (default: firecracker when installed and KVM is usable, else
# qemu); BUILDER_VMM_ACCEL=auto|kvm|tcg (default tcg on a virtual machine, where KVM is nested);
# NODE_AGENT_BIN (default: cargo build --release -p node-agent); KEEP_WORK=1 keeps the work dir.
#
# Topology. The guest may not reach the host (builder-vmm's egress rules), so the services the
# VM talks to live in a network namespace of this script, `bvt-out`, a stand-in for the
# Internet in 198.18.0.0/15 (VMs reach only public addresses; a private one would be dropped):
# veth `bvt-host` 198.18.251.1/30 ↔ `eth0` 198.18.251.2/30 in the namespace, which holds
# SeaweedFS (S3) and the requester's webhook receiver. The guest reaches them through its own
# namespace's NAT and the host's forwarding, like any outside host. A local directory's source
# comes from the node agent itself, at the host end of the VM's veth on the API port (the one
# port of the host a VM may reach, where it also posts its report). `FROM`
# images come from the rootfs: the busybox base image of the test dockerd is baked in with
# PRELOAD_IMAGES (build-builder-vm.sh only redoes that step and the image when it changed).
# The VM's name server is the outside namespace's address, where none answers: a lookup the
# build makes (a `# syntax=` frontend's registry) fails there, never leaving this machine.
#
# After the run it checks that no netns, veth, iptables rule, VMM process, VM work dir or
# uploaded source of this node is left, and tears down its own namespace and services (also on failure).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo_root=$PWD
# shellcheck source=scripts/lib/services.sh
source scripts/lib/services.sh
# shellcheck source=scripts/lib/hostile.sh
source scripts/lib/hostile.sh

usage() {
	sed -n '6,26s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
}
expect_user_error=false submit_extra=() serve_dir='' secret_id='' check_cmd='' hostile=false
while [[ ${1:-} == --* ]]; do
	case $1 in
	--expect-user-error) expect_user_error=true ;;
	--submit-arg) [[ $# -ge 2 ]] || usage; submit_extra+=("$2"); shift ;;
	--serve) [[ -d ${2:-} ]] || usage; serve_dir=$(realpath "$2"); shift ;;
	--secret) [[ -n ${2:-} ]] || usage; secret_id=$2; shift ;;
	--check) [[ -n ${2:-} ]] || usage; check_cmd=$(realpath "$2"); shift ;;
	--hostile) hostile=true ;;
	*) usage ;;
	esac
	shift
done
[[ $# -ge 1 && $# -le 3 ]] || usage
repo_arg=$1 ref=${2:-} dockerfile=${3:-}
bt_require_root "$0"

say() { printf '\n== %s\n' "$*"; }
fail() {
	printf 'test-builder-vm: FAILED: %s\n' "$*" >&2
	[[ -n ${console_log:-} ]] && printf 'test-builder-vm: the VM console log: %s\n' "$console_log" >&2
	exit 1
}
now_ms() { date +%s%3N; }
t_start=$(now_ms)
declare -a timings=()
mark() { # mark NAME START_MS: records how long the step NAME took
	timings+=("$(printf '%-34s %8.1f s' "$1" "$(bc <<<"scale=1; ($(now_ms) - $2) / 1000")")")
}

# ---- names and addresses ------------------------------------------------------------------------
ns=bvt-out
host_link=bvt-host
host_addr=198.18.251.1
out_addr=198.18.251.2
vm_network=10.219.0.0/16
vm_network_re='^10\.219\.'
node_id=test-builder-vm
node_tag=bvm-$(printf '%s' "$node_id" | sha256sum | cut -c1-8)-
api_port=17071
webhook_port=8090
serve_port=8091
s3_port=8333
s3_bucket=rootfs
s3_access=bvt-access
s3_secret=bvt-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
api_listen=127.0.0.1
capacity_vcpus=1
capacity_mem_mib=2048
weed_ports=() # SeaweedFS ports other than the defaults below (it names its /tmp sockets by port)
if $hostile; then hostile_names; fi

# ---- VMM and accelerator ------------------------------------------------------------------------
if [[ -z ${BUILDER_VMM_ACCEL:-} ]] && grep -qw hypervisor /proc/cpuinfo; then
	export BUILDER_VMM_ACCEL=tcg # KVM here is nested: it "works" but crawls
fi
firecracker_bin=${FIRECRACKER_BIN:-$(command -v firecracker || true)}
if [[ -z ${VMM:-} ]]; then
	if [[ -n $firecracker_bin && -w /dev/kvm && ${BUILDER_VMM_ACCEL:-auto} != tcg ]]; then
		VMM=firecracker
	else
		VMM=qemu
	fi
fi
case $VMM in firecracker | qemu) ;; *) fail "VMM=$VMM: use firecracker or qemu" ;; esac
[[ $VMM == firecracker && ${BUILDER_VMM_ACCEL:-} == tcg ]] &&
	fail "VMM=firecracker needs KVM, but BUILDER_VMM_ACCEL=tcg (unset it on a KVM host)"

# ---- cleanup (LIFO) ---------------------------------------------------------------------------
work=$(mktemp -d /tmp/test-builder-vm.XXXXXX)
declare -a undo=()
on_exit() {
	local status=$? i
	set +e
	for ((i = ${#undo[@]} - 1; i >= 0; i--)); do eval "${undo[i]}"; done
	# The script's own namespace, link and services must be gone too.
	if ip netns list | grep -qw "^$ns" || ip link show "$host_link" >/dev/null 2>&1 ||
		pgrep -f -- "$work/" >/dev/null; then
		echo "test-builder-vm: FAILED: teardown left $ns, $host_link or a process under $work" >&2
		((status != 0)) || status=1
	fi
	if [[ ${KEEP_WORK:-} == 1 || $status -ne 0 ]]; then
		echo "test-builder-vm: work dir kept: $work" >&2
	else
		rm -rf "$work"
	fi
	exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Stops the process group led by the pid in FILE (each service runs under setsid).
stop_group() {
	local pid
	[[ -s $1 ]] || return 0
	pid=$(<"$1")
	kill -TERM -- "-$pid" 2>/dev/null || return 0
	for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
	kill -KILL -- "-$pid" 2>/dev/null || true
}
# spawn NAME CMD...: runs CMD in its own session, output in $work/NAME.log, pid in $work/NAME.pid.
spawn() {
	local name=$1
	shift
	# shellcheck disable=SC2016
	setsid bash -c 'echo $$ >"$0"; exec "$@"' "$work/$name.pid" "$@" \
		</dev/null >>"$work/$name.log" 2>&1 &
	disown $! # no job notice when the group is stopped
	until [[ -s $work/$name.pid ]]; do sleep 0.05; done
	undo+=("stop_group $work/$name.pid")
}
wait_for() { # wait_for SECONDS WHAT CMD...
	local deadline=$((SECONDS + $1)) what=$2
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || fail "$what not ready after ${deadline}s (logs in $work)"
		sleep 0.2
	done
}

# ---- the base image baked into the builder image ------------------------------------------------
say "builder image: make builder-vm with the base image preloaded (VMM=$VMM, accel=${BUILDER_VMM_ACCEL:-auto})"
t=$(now_ms)
bt_ensure_deps
bt_lease_take
trap 'exit 130' INT # bt_lease_take set its own; ours run the LIFO stack through on_exit
trap 'exit 143' TERM
undo+=("bt_lease_release")
bt_build_builder_vm_with_base_image "$work/builder-vm.log" ||
	fail "make builder-vm failed (log: $work/builder-vm.log)"
jq -e --arg n "$(printf '%s' "${BT_BASE_IMAGE##*/}" | tr -c 'A-Za-z0-9._-' '_').tar" \
	'.preloaded_images | index($n)' build/vms/builder-vm.json >/dev/null ||
	fail "build/vms/builder-vm.json does not list the preloaded $BT_BASE_IMAGE"
mark "builder image (stamped rebuild)" "$t"

if [[ -n ${NODE_AGENT_BIN:-} ]]; then
	node_agent=$NODE_AGENT_BIN
else
	t=$(now_ms)
	cargo build --release -q -p node-agent
	node_agent=$repo_root/target/release/node-agent
	mark "cargo build node-agent" "$t"
fi

# ---- the outside namespace and its services ----------------------------------------------------
say "outside namespace $ns ($out_addr): SeaweedFS S3, webhook receiver"
t=$(now_ms)
ip netns list | grep -qw "^$ns" && fail "network namespace $ns exists: another run, or a crashed one (ip netns delete $ns)"
ip netns add "$ns"
undo+=("ip netns delete $ns")
ip link add "$host_link" type veth peer name eth0 netns "$ns"
undo+=("ip link delete $host_link 2>/dev/null")
ip addr add "$host_addr/30" dev "$host_link"
ip link set "$host_link" up
ip -n "$ns" addr add "$out_addr/30" dev eth0
ip -n "$ns" link set lo up
ip -n "$ns" link set eth0 up
ip -n "$ns" route add default via "$host_addr"
# The host routes between the VMs' namespaces and this one (builder-vmm enables forwarding too).
sysctl -qw net.ipv4.ip_forward=1

# The source: a local directory goes through `node-agent submit DIR`; a URL as it is.
if [[ $repo_arg == *://* || $repo_arg == *@*:* ]]; then
	[[ -n $ref ]] || fail "REPO $repo_arg is a URL: give the REF to build"
	source_args=("$repo_arg" --ref "$ref")
else
	[[ -d $repo_arg ]] || fail "REPO $repo_arg is neither a URL nor a directory"
	source_args=("$repo_arg")
fi

# S3: SeaweedFS with one key pair and the bucket the build uploads to.
mkdir -p "$work/s3-data"
(
	umask 077
	cat >"$work/s3.json" <<-EOF
		{"identities": [{"name": "bvt", "credentials": [{"accessKey": "$s3_access", "secretKey": "$s3_secret"}],
		  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
	EOF
)
spawn weed ip netns exec "$ns" "$(bt_weed_bin)" server -dir="$work/s3-data" -ip="$out_addr" \
	-ip.bind="$out_addr" -master.port=9333 -master.port.grpc=19333 -master.volumeSizeLimitMB=512 \
	-master.telemetry=false -master.electionTimeout=1s -volume.port=8080 -volume.port.grpc=18080 \
	-volume.max=0 -volume.preStopSeconds=0 -filer -filer.port=8888 -filer.port.grpc=18888 \
	-s3 -s3.port=$s3_port -s3.port.grpc=18333 -s3.port.iceberg=0 -s3.port.lance=0 \
	-s3.config="$work/s3.json" "${weed_ports[@]}"
s3_endpoint=http://$out_addr:$s3_port
s3() { curl -sS --max-time 30 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$s3_access:$s3_secret" "$@"; }
s3_bucket_made() { [[ $(s3 -o /dev/null -w '%{http_code}' -X PUT "$s3_endpoint/$s3_bucket") =~ ^(200|409)$ ]]; }
s3_writable() {
	[[ $(printf probe | s3 -o /dev/null -w '%{http_code}' -T - "$s3_endpoint/$s3_bucket/.probe") == 200 ]]
}
wait_for 90 "SeaweedFS S3" s3_bucket_made
wait_for 90 "SeaweedFS S3 writes" s3_writable
(
	umask 077
	printf '{"s3": {"endpoint": "%s", "region": "us-east-1", "access_key_id": "%s", "secret_access_key": "%s"}}\n' \
		"$s3_endpoint" "$s3_access" "$s3_secret" >"$work/s3-credentials.json"
	head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/notify-secret"
)

# The requester's webhook receiver (verifies the node agent's signature).
spawn webhook ip netns exec "$ns" python3 scripts/lib/webhook-receiver.py --bind "$out_addr" \
	--port $webhook_port --secret-file "$work/notify-secret" --out "$work/webhooks"
wait_for 20 "webhook receiver" bash -c "exec 3<>/dev/tcp/$out_addr/$webhook_port"
served_url=http://$out_addr:$serve_port
if [[ -n $serve_dir ]]; then
	spawn served ip netns exec "$ns" python3 -m http.server --bind "$out_addr" --directory "$serve_dir" "$serve_port"
	wait_for 20 "file server" bash -c "exec 3<>/dev/tcp/$out_addr/$serve_port"
fi
mark "outside services up" "$t"
if $hostile; then
	hostile_targets_up
	hostile_prepare_source "$repo_arg"
fi

# ---- the node agent ---------------------------------------------------------------------------
say "node-agent serve ($VMM, work dir $work/node)"
t=$(now_ms)
mkdir -p "$work/node"
# The API on loopback, as by default: the VM reaches the node on a listener of its own (the host
# end of its veth, vm_listen_port), which serves only its report, logs and source.
spawn node-agent "$node_agent" serve --work-dir "$work/node" --listen "$api_listen:$api_port" \
	--node-id "$node_id" --capacity-vcpus "$capacity_vcpus" --capacity-mem-mib "$capacity_mem_mib" --vmm "$VMM" \
	--kernel build/vms/vmlinux --rootfs build/vms/builder-rootfs.ext4 --vm-network "$vm_network" \
	--s3-credentials-file "$work/s3-credentials.json" --notify-secret-file "$work/notify-secret" \
	--vm-dns "$out_addr" --notify-allow "$out_addr" \
	--grace-period-s 5
wait_for 30 "node-agent" curl -sf "http://127.0.0.1:$api_port/healthz"
curl -sf "http://127.0.0.1:$api_port/readyz" >"$work/readyz.json" ||
	fail "node-agent is not ready: $(cat "$work/readyz.json")"
mark "node agent up" "$t"

# ---- the build --------------------------------------------------------------------------------
s3_key=test-builder-vm/$(date +%s)-$$.ext4
say "node-agent submit ${source_args[*]}${dockerfile:+ --dockerfile $dockerfile} --wait"
t=$(now_ms)
submit_status=0
secret_value=''
if [[ -n $secret_id ]]; then
	secret_value=bvt-secret-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
	(umask 077 && printf '%s' "$secret_value" >"$work/secret-$secret_id")
	submit_extra+=(--secret "id=$secret_id,src=$work/secret-$secret_id")
fi
submit_extra=("${submit_extra[@]//\{served\}/$served_url}")
if $hostile; then hostile_before_submit; fi
"$node_agent" submit "${source_args[@]}" "${submit_extra[@]}" --server "http://127.0.0.1:$api_port" \
	--token-file "$work/node/api-token" ${dockerfile:+--dockerfile "$dockerfile"} \
	--s3-bucket "$s3_bucket" --s3-key "$s3_key" \
	--notify-url "http://$out_addr:$webhook_port/hook" --vcpus 1 --mem-mib 2048 --disk-gib 4 \
	--timeout-s 900 --wait | tee "$work/submit.out" || submit_status=$?
mark "build (submit → final state)" "$t"
build_id=$(head -n1 "$work/submit.out")
[[ $build_id =~ ^[A-Za-z0-9_-]+$ ]] || fail "node-agent submit printed no build id (exit $submit_status)"
console_log=$work/node/logs/$build_id.log
"$node_agent" status "$build_id" --json --server "http://127.0.0.1:$api_port" \
	--token-file "$work/node/api-token" >"$work/build.json" || true
if $hostile; then hostile_after_submit "$build_id"; fi

# The requester's webhook: exactly one, signed (the receiver only records verified ones).
t=$(now_ms)
wait_for 60 "the requester webhook" test -s "$work/webhooks/$build_id.json"
report=$work/webhooks/$build_id.json
mark "webhook after the final state" "$t"

say "result"
jq -r '"build \(.build_id): \(.status) \(.repo_url)@\(.revision) commit \(.commit_sha // "-")"' "$report"
echo "phases (from the report):"
jq -r '.phases[] | "  \(.phase | . + " " * (10 - length)) \(.duration_ms / 1000) s"' "$report"
jq -r '"  total      \(.duration_ms / 1000) s (agent start to report)"' "$report"
if [[ -f $console_log ]]; then
	echo "boot (from the console: kernel clock at init, then the agent's own clock):"
	grep -o '\[ *[0-9.]*\] Run [^ ]* as init process\|builder-agent: filesystems ready in [0-9]* ms\|builder-agent: dockerd ready in [0-9]* ms\|builder-agent: exit=[0-9]*' \
		"$console_log" | sed 's/^/  /' || true
else
	fail "no console log at $console_log"
fi
jq -r '"node agent: state \(.state), admission \(.timings.admission_ms // "-") ms, duration \(.timings.duration_ms // "-") ms, VMM start to end \((.timings.finished_at_ms // 0) - (.timings.vm_started_at_ms // 0)) ms, VMM exit \(.vmm_exit_code // "-"), webhook \(.webhook.state // "-")"' \
	"$work/build.json" 2>/dev/null || true

# The node kept every log of the build: the guest's build and dockerd logs came signed over the
# VM's listener, the VMM's log was copied out before cleanup.
for source in console vmm build dockerd; do
	"$node_agent" logs "$build_id" --source "$source" --server "http://127.0.0.1:$api_port" \
		--token-file "$work/node/api-token" >"$work/log-$source.txt" ||
		fail "node-agent logs --source $source failed"
	[[ -s $work/log-$source.txt ]] || fail "the node kept no $source log"
done
grep -q '^.*==> clone' "$work/log-build.txt" || fail "the kept build log has none of the agent's phase lines"
echo "kept logs: $(for s in console vmm build dockerd; do printf '%s %s B  ' "$s" "$(stat -c %s "$work/log-$s.txt")"; done)"

# The VM shut itself down: the agent printed its exit marker and the VMM exited on its own.
grep -q 'builder-agent: exit=' "$console_log" ||
	fail "the guest agent never reported its exit on the console (did the VM shut down itself?)"
[[ -f $work/webhooks/$build_id.json ]] || fail "no webhook for $build_id"
[[ $(find "$work/webhooks" -name '*.json' | wc -l) -eq 1 ]] || fail "more than one webhook"

status=$(jq -r .status "$report")
if $expect_user_error; then
	class=$(jq -r '.error.class // "-"' "$report")
	jq -r '.error // empty | "error: \(.class) in \(.phase): \(.message)"' "$report"
	[[ $status == failed && $class == user ]] ||
		fail "expected a user error, got status $status class $class"
	[[ $submit_status -eq 1 ]] || fail "node-agent submit exited $submit_status, not 1 (user error)"
else
	[[ $status == succeeded && $submit_status -eq 0 ]] ||
		fail "the build $status (submit exit $submit_status): $(jq -r '.error.message // ""' "$report")"
	location=$(jq -r .rootfs.location "$report")
	sha=$(jq -r .rootfs.sha256 "$report")
	[[ $location == "s3://$s3_bucket/$s3_key" ]] || fail "rootfs landed at $location, not s3://$s3_bucket/$s3_key"
	t=$(now_ms)
	s3 -f -o "$work/rootfs.ext4" "$s3_endpoint/$s3_bucket/$s3_key" || fail "cannot read $location back from S3"
	mark "read the rootfs back from S3" "$t"
	got=$(sha256sum "$work/rootfs.ext4" | cut -d' ' -f1)
	[[ $got == "$sha" ]] || fail "$location has sha256 $got, the report says $sha"
	echo "rootfs: $location ($(stat -c %s "$work/rootfs.ext4") bytes), sha256 $sha: read back from S3, matches"
	echo "config: $(jq -r .rootfs.config_location "$report")"
	debugfs -R 'ls -l /app' "$work/rootfs.ext4" 2>/dev/null | sed 's/^/  /' | head -n 12 || true
	if [[ -n $check_cmd ]]; then
		"$check_cmd" "$work/rootfs.ext4" ${secret_value:+"$secret_value"} || fail "$check_cmd found the rootfs wrong"
	fi
	if $hostile; then hostile_check_rootfs "$work/rootfs.ext4"; fi
	rm -f "$work/rootfs.ext4"
fi

# ---- nothing of this node may be left ----------------------------------------------------------
say "leftovers"
t=$(now_ms)
stop_group "$work/node-agent.pid"
if [[ -n $secret_value ]]; then
	# The node's database (and its WAL), logs, console logs and the webhooks: the value of the
	# build secret is in none of them, only in the file this script gave to `submit`.
	found=$(grep -rlaF -- "$secret_value" "$work" | grep -v -- "/secret-$secret_id\$" || true)
	[[ -z $found ]] || fail "the build secret's value is in: $found"
	echo "  the build secret's value is nowhere under $work (database, logs, console, webhooks)"
fi
leftovers=()
while read -r n _; do [[ $n == "$node_tag"* ]] && leftovers+=("netns $n"); done < <(ip netns list)
while read -r link addr; do
	[[ $addr =~ $vm_network_re ]] && leftovers+=("link $link ($addr)")
done < <(ip -o -4 addr show | awk '{print $2, $4}')
if iptables-save | grep -q -- "$node_tag"; then leftovers+=("iptables rules tagged $node_tag"); fi
if iptables-save -t nat | grep -q -- "$node_tag"; then leftovers+=("nat rules tagged $node_tag"); fi
# A VMM's command line names its VM's tag (QEMU's -name, the jailer's --id), never the work dir:
# QEMU sees only the paths of its jail.
for pid in $(pgrep -f "qemu-system|firecracker" || true); do
	grep -q -- "$node_tag" "/proc/$pid/cmdline" 2>/dev/null && leftovers+=("process $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline"))")
done
for cgroup in $(find /sys/fs/cgroup -maxdepth 4 -type d -name "$node_tag*" 2>/dev/null); do leftovers+=("cgroup $cgroup"); done
for dir in "$work/node/vms" "$work/node/jail/qemu" "$work/node/jail/firecracker" "$work/node/sources"; do
	left=$(find "$dir" -mindepth 1 -maxdepth 1 -printf '%f ' 2>/dev/null || true)
	[[ -z $left ]] || leftovers+=("files in $dir: $left")
done
mark "leftover check" "$t"
if ((${#leftovers[@]})); then
	printf '  left: %s\n' "${leftovers[@]}" >&2
	fail "the build left ${#leftovers[@]} thing(s) behind"
fi
echo "  none: no netns $node_tag*, no address in $vm_network, no tagged iptables rule, no VMM process, no VM work dir, no uploaded source"

mark "whole run" "$t_start"
say "wall times"
printf '  %s\n' "${timings[@]}"
if [[ ${KEEP_WORK:-} == 1 ]]; then
	echo "console log: $console_log"
else
	echo "console log: $console_log (removed with the work dir; KEEP_WORK=1 keeps it)"
fi
if $hostile; then hostile_verdict; fi
echo "test-builder-vm: OK"
