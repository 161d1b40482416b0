# shellcheck shell=bash
# Which Docker this project builds with, in one place: Docker 26.1 (docker.io + docker-cli),
# buildx 0.13 (docker-buildx) and containerd 1.7 from Debian 13 (trixie), installed on Debian 12
# (bookworm) and run with Debian 12's runc 1.1.5. The same packages go into the host's test
# services (scripts/lib/services.sh, bt_ensure_deps) and into the builder VM's root filesystem
# (scripts/build-builder-vm.sh, CHROOT_CMDS), so tests and production build with one builder.
#
# Why these and how:
#   - Debian 12's docker.io is 20.10: classic builder, no buildx. builder-agent drives
#     `docker buildx build` (BuildKit, docker driver), which needs the buildx plugin and a
#     dockerd with BuildKit's current frontend features (heredocs, RUN --mount, COPY --link).
#   - Everything Debian 13's docker.io, docker-cli, docker-buildx and containerd depend on is
#     satisfied by Debian 12 (libc6 >= 2.34, sysvinit-utils >= 3.05-4, iptables, tini, runc),
#     so they install on Debian 12 as they are. Its runc needs glibc 2.38 (Debian 12 has 2.36):
#     runc stays Debian 12's, which containerd 1.7 and dockerd 26 accept.
#   - The trixie source is pinned to priority 100 (below the base's 500): apt takes a package
#     from trixie only when it is asked for by name as PKG/trixie, so no upgrade or dependency
#     ever pulls trixie's libc6 (or anything else) into the Debian 12 system.
# After every install docker_pkgs_check verifies the versions and that nothing but the packages
# below came from trixie.
#
# Sourced by bash scripts that run `set -euo pipefail`; functions return non-zero with a message
# on stderr, callers decide how to die. Prefix: docker_pkgs_.

DOCKER_PKGS_SUITE=trixie
# Taken from trixie, by name.
DOCKER_PKGS_FROM_SUITE=(docker.io docker-cli docker-buildx containerd)
# Taken from the base system's own suite (Debian 12): trixie's runc does not run on glibc 2.36.
DOCKER_PKGS_FROM_BASE=(runc)
# The `apt-get install` arguments, as CHROOT_CMDS and the host install use them.
DOCKER_PKGS_APT_ARGS="${DOCKER_PKGS_FROM_SUITE[*]/%//$DOCKER_PKGS_SUITE} ${DOCKER_PKGS_FROM_BASE[*]}"
# What the installed versions must start with (dpkg versions, without the Debian revision).
DOCKER_PKGS_WANT_DOCKER=26.1.
DOCKER_PKGS_WANT_BUILDX=0.13.
DOCKER_PKGS_WANT_CONTAINERD=1.7.
# The dockerd major version the host's test services require (bt_ensure_deps).
# shellcheck disable=SC2034 # read by scripts/lib/services.sh
DOCKER_PKGS_DOCKER_MAJOR=26

# Relative to the root of the system they configure (/ or the builder VM's rootfs).
DOCKER_PKGS_SOURCE_FILE=etc/apt/sources.list.d/builder-vm-trixie.sources
DOCKER_PKGS_PIN_FILE=etc/apt/preferences.d/builder-vm-trixie
DOCKER_PKGS_KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

# The first Debian archive this machine's apt uses (one-line or deb822 sources), if any.
docker_pkgs_host_mirror() {
	local file
	for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[ -r "$file" ] || continue
		sed -n -e 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' \
			-e 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\{0,1\}\([^[:space:]]*\).*/\2/p' "$file"
	done | grep -E '/debian/?$' | head -n1 || true
}

# Writes the trixie apt source and its pin under ROOT, served by MIRROR (a Debian archive).
# The keyring is Debian 12's debian-archive-keyring, which holds the trixie signing keys.
# Prints "changed" when a file was (re)written, so the caller knows to run apt-get update.
docker_pkgs_write_apt_config() {
	local root=${1%/} mirror=${2%/} source pin
	source=$(printf '%s\n' \
		"# Docker 26.1, buildx 0.13 and containerd 1.7 from Debian 13 on this Debian 12 system:" \
		"# see scripts/lib/docker-packages.sh in builder-vm. Pinned low in" \
		"# /$DOCKER_PKGS_PIN_FILE, so only packages asked for as PKG/$DOCKER_PKGS_SUITE come from here." \
		"Types: deb" "URIs: $mirror" "Suites: $DOCKER_PKGS_SUITE" "Components: main" \
		"Signed-By: $DOCKER_PKGS_KEYRING")
	pin=$(printf '%s\n' \
		"# Nothing from Debian 13 unless asked for by name (PKG/$DOCKER_PKGS_SUITE): its libc6 and" \
		"# runc must never replace Debian 12's. See scripts/lib/docker-packages.sh in builder-vm." \
		"Package: *" "Pin: release n=$DOCKER_PKGS_SUITE" "Pin-Priority: 100")
	[ -r "$root$DOCKER_PKGS_KEYRING" ] || {
		echo "error: $root$DOCKER_PKGS_KEYRING is missing (package debian-archive-keyring); it verifies the $DOCKER_PKGS_SUITE archive" >&2
		return 1
	}
	mkdir -p "$root/$(dirname "$DOCKER_PKGS_SOURCE_FILE")" "$root/$(dirname "$DOCKER_PKGS_PIN_FILE")"
	local changed=false
	if [ "$(cat "$root/$DOCKER_PKGS_SOURCE_FILE" 2>/dev/null)" != "$source" ]; then
		printf '%s\n' "$source" >"$root/$DOCKER_PKGS_SOURCE_FILE"
		changed=true
	fi
	if [ "$(cat "$root/$DOCKER_PKGS_PIN_FILE" 2>/dev/null)" != "$pin" ]; then
		printf '%s\n' "$pin" >"$root/$DOCKER_PKGS_PIN_FILE"
		changed=true
	fi
	if $changed; then echo changed; fi
}

# Reads `apt-cache policy` of the installed packages on stdin and prints each package whose
# installed version is available only from the pinned suite (that is, came from trixie).
docker_pkgs_from_suite() {
	awk -v suite="$DOCKER_PKGS_SUITE" '
		function done_version() {
			if (inst && from_suite && !from_other) print pkg
			inst = 0; from_suite = 0; from_other = 0
		}
		/^[^ ].*:$/ { done_version(); pkg = substr($0, 1, length($0) - 1); next }
		/^ \*\*\* / { done_version(); inst = 1; next }
		/^     [^ ]/ { done_version(); next }
		inst && /^        [0-9-]+ / {
			if ($2 ~ /^\/var\/lib\/dpkg\/status$/) next
			split($3, where, "/")
			if (where[1] == suite) from_suite = 1; else from_other = 1
		}
		END { done_version() }'
}

# The installed version of package PKG in ROOT, empty when it is not installed.
docker_pkgs_installed_version() {
	dpkg-query --admindir="${1%/}/var/lib/dpkg" -W -f='${Status} ${Version}\n' "$2" 2>/dev/null |
		sed -n 's/^install ok installed //p'
}

# The codename of the Debian release installed in ROOT (bookworm, trixie, ...).
docker_pkgs_codename() {
	sed -n 's/^VERSION_CODENAME=//p' "${1%/}/etc/os-release" 2>/dev/null | tr -d '"'
}

# Checks the Docker packages installed in ROOT (default /): each present, the versions this
# project is built on, runc from the base system, nothing else from trixie (unless ROOT is
# trixie itself). POLICY_FILE holds `apt-cache policy` of ROOT's installed packages (made while
# ROOT's package lists exist).
docker_pkgs_check() {
	local root=${1%/} policy=$2 pkg version ok=true extra
	for pkg in "${DOCKER_PKGS_FROM_SUITE[@]}" "${DOCKER_PKGS_FROM_BASE[@]}"; do
		[ -n "$(docker_pkgs_installed_version "$root" "$pkg")" ] || {
			echo "error: package $pkg is not installed in ${root:-/}" >&2
			ok=false
		}
	done
	$ok || return 1
	for pkg in docker.io:$DOCKER_PKGS_WANT_DOCKER docker-cli:$DOCKER_PKGS_WANT_DOCKER \
		docker-buildx:$DOCKER_PKGS_WANT_BUILDX containerd:$DOCKER_PKGS_WANT_CONTAINERD; do
		version=$(docker_pkgs_installed_version "$root" "${pkg%%:*}")
		case ${version#*:} in
		"${pkg#*:}"*) ;;
		*)
			echo "error: ${root:-/} has ${pkg%%:*} $version; this project builds with ${pkg%%:*} ${pkg#*:}x (scripts/lib/docker-packages.sh)" >&2
			ok=false
			;;
		esac
	done
	[ -x "${root:-}/usr/libexec/docker/cli-plugins/docker-buildx" ] || {
		echo "error: ${root:-/} has no buildx CLI plugin at /usr/libexec/docker/cli-plugins/docker-buildx" >&2
		ok=false
	}
	if [ "$(docker_pkgs_codename "$root")" = "$DOCKER_PKGS_SUITE" ]; then
		$ok
		return
	fi
	# Anything from trixie that is not one of ours (a dependency pulled along: libc6 would
	# break runc and every other binary of the base system).
	extra=$(docker_pkgs_from_suite <"$policy" | grep -vxF -f <(printf '%s\n' "${DOCKER_PKGS_FROM_SUITE[@]}") || true)
	if [ -n "$extra" ]; then
		echo "error: packages other than ${DOCKER_PKGS_FROM_SUITE[*]} came from $DOCKER_PKGS_SUITE into ${root:-/}: ${extra//$'\n'/ }" >&2
		ok=false
	fi
	if docker_pkgs_from_suite <"$policy" | grep -qxF -f <(printf '%s\n' "${DOCKER_PKGS_FROM_BASE[@]}"); then
		echo "error: ${DOCKER_PKGS_FROM_BASE[*]} in ${root:-/} came from $DOCKER_PKGS_SUITE, not from the base system" >&2
		ok=false
	fi
	$ok
}

# One line for logs: "docker.io 26.1.5+dfsg1-9+deb13u1+b1, docker-buildx 0.13.1+ds1-3, ...".
docker_pkgs_versions() {
	local root=${1%/} pkg parts=()
	for pkg in "${DOCKER_PKGS_FROM_SUITE[@]}" "${DOCKER_PKGS_FROM_BASE[@]}"; do
		parts+=("$pkg $(docker_pkgs_installed_version "$root" "$pkg")")
	done
	local IFS=,
	local joined="${parts[*]}"
	echo "${joined//,/, }"
}

# Installs (or upgrades to) these packages on this machine, a Debian 12 host, as root.
docker_pkgs_install_host() {
	local mirror policy
	export DEBIAN_FRONTEND=noninteractive
	mirror=$(docker_pkgs_host_mirror)
	mirror=${mirror:-http://deb.debian.org/debian}
	# On Debian 13 itself the system's own sources have these packages.
	if [ "$(docker_pkgs_codename /)" != "$DOCKER_PKGS_SUITE" ]; then
		docker_pkgs_write_apt_config / "$mirror" >/dev/null || return 1
	fi
	echo "[docker-packages] apt-get update (with $DOCKER_PKGS_SUITE from $mirror, pinned)" >&2
	apt-get update -qq >/dev/null || {
		echo "error: apt-get update failed with /$DOCKER_PKGS_SOURCE_FILE ($mirror $DOCKER_PKGS_SUITE)" >&2
		return 1
	}
	echo "[docker-packages] apt-get install $DOCKER_PKGS_APT_ARGS" >&2
	# shellcheck disable=SC2086 # a word list
	apt-get install -y -qq --no-install-recommends $DOCKER_PKGS_APT_ARGS >/dev/null || {
		echo "error: apt-get install $DOCKER_PKGS_APT_ARGS failed" >&2
		return 1
	}
	policy=$(mktemp)
	dpkg-query -W -f='${Package}\n' | xargs apt-cache policy >"$policy" 2>/dev/null
	docker_pkgs_check / "$policy" || {
		rm -f "$policy"
		return 1
	}
	rm -f "$policy"
	echo "[docker-packages] installed: $(docker_pkgs_versions /)" >&2
}
