#!/usr/bin/env bash
# A stand-in for the Internet for runs of real builder VMs that upload (scripts/bench-rebuild.sh,
# node-agent's warm-build VM tests): a network namespace with SeaweedFS S3 and, on request, an
# "upstream" registry, in 198.18.0.0/15 (a public range: VMs may reach it, a private one would
# be dropped), joined to the host by a veth pair and routed by the host's forwarding.
#
# Usage: outside.sh up DIR NAME OCTET [--registry]
#          NAME   the namespace (host end of the veth: NAME-h; at most 13 characters)
#          OCTET  the /30 198.18.OCTET.0: host 198.18.OCTET.1, namespace 198.18.OCTET.2; also
#                 offsets SeaweedFS's ports, which name its /tmp sockets (one OCTET per run)
#          --registry  docker-registry on 198.18.OCTET.2:5000, htpasswd auth, access log on,
#                 holding a copy of the test registry's images (scripts/services.sh start), e.g.
#                 private/busybox:latest: the upstream of a node's pull-through mirror
#        outside.sh down DIR
# `up` writes DIR/outside.env (shell assignments: OUTSIDE_NS, OUTSIDE_LINK, OUTSIDE_HOST_ADDR,
# OUTSIDE_ADDR, S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY, S3_BUCKET; with --registry also
# UPSTREAM_REGISTRY (addr:port), UPSTREAM_USER, UPSTREAM_PASSWORD_FILE, UPSTREAM_LOG) and
# DIR/s3-credentials.json for `node-agent serve --s3-credentials-file`. Every process runs in a
# session of its own with its pid in DIR/*.pid and its log in DIR/*.log; `down` stops them and
# removes the namespace and the link (also after a failed `up`). Root only.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
# shellcheck source=scripts/lib/services.sh
source "$repo/scripts/lib/services.sh"

usage() {
	sed -n '6,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

# spawn DIR NAME CMD...: CMD in its own session, output in DIR/NAME.log, pid in DIR/NAME.pid.
spawn() {
	local dir=$1 name=$2
	shift 2
	# shellcheck disable=SC2016
	setsid bash -c 'echo $$ >"$0"; exec "$@"' "$dir/$name.pid" "$@" \
		</dev/null >>"$dir/$name.log" 2>&1 &
	disown $!
	until [[ -s $dir/$name.pid ]]; do sleep 0.05; done
}

# wait_for SECONDS WHAT CMD...
wait_for() {
	local seconds=$1 what=$2
	local deadline=$((SECONDS + seconds))
	shift 2
	until "$@" >/dev/null 2>&1; do
		((SECONDS < deadline)) || bt_die "outside: $what not ready after $seconds s"
		sleep 0.2
	done
}

up() {
	local dir=$1 ns=$2 octet=$3 registry=$4
	[[ ${#ns} -le 13 && $octet =~ ^[0-9]+$ && $octet -ge 1 && $octet -le 254 ]] || usage
	local link=$ns-h host_addr=198.18.$octet.1 addr=198.18.$octet.2
	local access=outside-access secret
	secret=outside-secret-$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
	mkdir -p "$dir"
	cat >"$dir/outside.env" <<-EOF
		OUTSIDE_NS=$ns
		OUTSIDE_LINK=$link
		OUTSIDE_HOST_ADDR=$host_addr
		OUTSIDE_ADDR=$addr
		S3_ENDPOINT=http://$addr:8333
		S3_ACCESS_KEY=$access
		S3_SECRET_KEY=$secret
		S3_BUCKET=rootfs
	EOF
	! ip netns list | grep -qw "^$ns" ||
		bt_die "outside: network namespace $ns exists: another run, or a crashed one (outside.sh down DIR, or ip netns delete $ns)"
	ip netns add "$ns"
	ip link add "$link" type veth peer name eth0 netns "$ns"
	ip addr add "$host_addr/30" dev "$link"
	ip link set "$link" up
	ip -n "$ns" addr add "$addr/30" dev eth0
	ip -n "$ns" link set lo up
	ip -n "$ns" link set eth0 up
	ip -n "$ns" route add default via "$host_addr"
	sysctl -qw net.ipv4.ip_forward=1

	# SeaweedFS: one key pair, the bucket builds upload to. Ports apart per OCTET: it names its
	# /tmp sockets by port, so two runs on the same ports would talk to each other's servers.
	bt_ensure_weed
	local p=$((20000 + octet * 10))
	mkdir -p "$dir/s3-data"
	(
		umask 077
		cat >"$dir/s3.json" <<-EOF
			{"identities": [{"name": "outside", "credentials": [{"accessKey": "$access", "secretKey": "$secret"}],
			  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
		EOF
		printf '{"s3": {"endpoint": "http://%s:8333", "region": "us-east-1", "access_key_id": "%s", "secret_access_key": "%s"}}\n' \
			"$addr" "$access" "$secret" >"$dir/s3-credentials.json"
	)
	spawn "$dir" weed ip netns exec "$ns" "$(bt_weed_bin)" server -dir="$dir/s3-data" -ip="$addr" \
		-ip.bind="$addr" -master.port=$p -master.port.grpc=$((p + 1)) -master.volumeSizeLimitMB=512 \
		-master.telemetry=false -master.electionTimeout=1s -volume.port=$((p + 2)) \
		-volume.port.grpc=$((p + 3)) -volume.max=0 -volume.preStopSeconds=0 -filer \
		-filer.port=$((p + 4)) -filer.port.grpc=$((p + 5)) -s3 -s3.port=8333 \
		-s3.port.grpc=$((p + 6)) -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$dir/s3.json"
	s3() { curl -sS --max-time 30 --aws-sigv4 "aws:amz:us-east-1:s3" --user "$access:$secret" "$@"; }
	bucket_made() { [[ $(s3 -o /dev/null -w '%{http_code}' -X PUT "http://$addr:8333/rootfs") =~ ^(200|409)$ ]]; }
	writable() { [[ $(printf probe | s3 -o /dev/null -w '%{http_code}' -T - "http://$addr:8333/rootfs/.probe") == 200 ]]; }
	wait_for 90 "SeaweedFS S3" bucket_made
	wait_for 90 "SeaweedFS S3 writes" writable

	if $registry; then
		# The test registry's storage, copied: its images without pushing them again.
		bt_registry_ready || bt_die "outside: the test registry is not running (scripts/services.sh start)"
		cp -a "$BT_DATA/registry" "$dir/upstream-data"
		(
			umask 077
			printf '%s' "$BT_REGISTRY_PASSWORD" >"$dir/upstream-password"
			cp "$BT_STATE/registry.htpasswd" "$dir/upstream.htpasswd"
			cat >"$dir/upstream.yml" <<-EOF
				# Written by scripts/lib/outside.sh: the upstream of a node's registry mirror.
				version: 0.1
				log:
				  level: info
				storage:
				  filesystem:
				    rootdirectory: $dir/upstream-data
				http:
				  addr: $addr:5000
				  secret: outside-upstream-registry-secret
				auth:
				  htpasswd:
				    realm: outside-upstream
				    path: $dir/upstream.htpasswd
			EOF
		)
		spawn "$dir" upstream ip netns exec "$ns" /usr/bin/docker-registry serve "$dir/upstream.yml"
		upstream_ready() {
			[[ $(curl -s -o /dev/null -w '%{http_code}' -u "$BT_REGISTRY_USER:$BT_REGISTRY_PASSWORD" \
				"http://$addr:5000/v2/") == 200 ]]
		}
		wait_for 30 "the upstream registry" upstream_ready
		cat >>"$dir/outside.env" <<-EOF
			UPSTREAM_REGISTRY=$addr:5000
			UPSTREAM_USER=$BT_REGISTRY_USER
			UPSTREAM_PASSWORD_FILE=$dir/upstream-password
			UPSTREAM_LOG=$dir/upstream.log
		EOF
	fi
}

down() {
	local dir=$1 pidfile pid
	for pidfile in "$dir"/*.pid; do
		[[ -s $pidfile ]] || continue
		pid=$(<"$pidfile")
		kill -TERM -- "-$pid" 2>/dev/null || continue
		for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
		kill -KILL -- "-$pid" 2>/dev/null || true
		rm -f "$pidfile"
	done
	[[ -f $dir/outside.env ]] || return 0
	local ns link
	ns=$(sed -n 's/^OUTSIDE_NS=//p' "$dir/outside.env")
	link=$(sed -n 's/^OUTSIDE_LINK=//p' "$dir/outside.env")
	ip link delete "$link" 2>/dev/null || true
	ip netns delete "$ns" 2>/dev/null || true
}

bt_require_root "$0"
case ${1:-} in
up)
	[[ $# -ge 4 && $# -le 5 ]] || usage
	registry=false
	if [[ $# == 5 ]]; then [[ $5 == --registry ]] || usage; registry=true; fi
	dir=$(realpath -m "$2")
	# A failed `up` (set -e, bt_die) takes down what it made.
	trap 'down "$dir"' EXIT
	up "$dir" "$3" "$4" "$registry"
	trap - EXIT
	;;
down)
	[[ $# == 2 ]] || usage
	down "$(realpath -m "$2")"
	;;
*) usage ;;
esac
