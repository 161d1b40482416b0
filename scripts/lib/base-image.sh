# shellcheck shell=bash
# The base image test Dockerfiles and the bundled example start FROM. No registry is reachable,
# so it is made here: a root filesystem of Debian's statically linked busybox with every applet
# linked in, root/nobody/app users, imported into the test dockerd. Sourced by services.sh.
# The image carries a label with a digest of this recipe and of the busybox binary, so a changed
# recipe replaces it and an unchanged one is never rebuilt.

BT_BASE_IMAGE=builder-vm/busybox:latest
BT_BASE_RECIPE_LABEL=builder-vm.base-recipe

# Path of the static busybox from Debian's busybox-static (the dynamic one would not run alone).
bt_busybox_static() {
	dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' || return 1
	dpkg-query -L busybox-static | grep -m1 '/bin/busybox$'
}

# Fills directory ROOT with the base image's files.
bt_make_base_rootfs() {
	local busybox=$1 root=$2 applet
	mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,home/app,var/tmp}
	chmod 1777 "$root/tmp" "$root/var/tmp"
	chmod 0700 "$root/root"
	install -m 0755 "$busybox" "$root/bin/busybox"
	for applet in $("$busybox" --list-full); do
		[[ -e $root/$applet ]] || ln -s /bin/busybox "$root/$applet"
	done
	cat >"$root/etc/passwd" <<-'EOF'
		root:x:0:0:root:/root:/bin/sh
		app:x:1000:1000:app:/home/app:/bin/sh
		nobody:x:65534:65534:nobody:/nonexistent:/bin/false
	EOF
	cat >"$root/etc/group" <<-'EOF'
		root:x:0:
		app:x:1000:
		nogroup:x:65534:
	EOF
	chown 1000:1000 "$root/home/app"
}

# Imports the base image into the test dockerd unless the same recipe is already there.
bt_ensure_base_image() {
	local busybox recipe current scratch
	busybox=$(bt_busybox_static) || bt_die "busybox-static is not installed"
	recipe=$({
		declare -f bt_make_base_rootfs
		sha256sum <"$busybox"
	} | sha256sum | cut -c1-16)
	current=$(bt_docker image inspect --format "{{index .Config.Labels \"$BT_BASE_RECIPE_LABEL\"}}" \
		"$BT_BASE_IMAGE" 2>/dev/null) || true
	[[ $current == "$recipe" ]] && return 0
	bt_log "importing base image $BT_BASE_IMAGE (recipe $recipe)"
	scratch=$(mktemp -d)
	bt_make_base_rootfs "$busybox" "$scratch/rootfs"
	if ! tar --numeric-owner --sort=name -C "$scratch/rootfs" -c . |
		bt_docker import \
			--change "LABEL $BT_BASE_RECIPE_LABEL=$recipe" \
			--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
			--change 'CMD ["/bin/sh"]' \
			- "$BT_BASE_IMAGE" >/dev/null; then
		rm -rf "$scratch"
		bt_die "docker import of $BT_BASE_IMAGE failed"
	fi
	rm -rf "$scratch"
}

# Builds build/vms (scripts/build-builder-vm.sh, a stamped rebuild) with the base image preloaded,
# as the VM suites and benchmarks whose Dockerfiles start FROM it need; the build's output goes to
# LOG, and its tail to stderr when it fails (then non-zero).
bt_build_builder_vm_with_base_image() {
	local log=$1
	bt_lock
	bt_start_dockerd
	bt_ensure_base_image
	bt_unlock
	DOCKER_HOST=unix://$BT_DOCKER_SOCK PRELOAD_IMAGES=$BT_BASE_IMAGE \
		"$BT_LIB_DIR/../build-builder-vm.sh" >"$log" 2>&1 || {
		tail -n 30 "$log" >&2
		return 1
	}
}
