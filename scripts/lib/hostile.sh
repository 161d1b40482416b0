# shellcheck shell=bash
# The hostile mode of scripts/test-builder-vm.sh (`--hostile`, `make test-builder-vm-hostile`):
# the targets a hostile build attacks, the builds that run beside it, and the checks made from
# the outside. What each attempt covers and proves: docs/security/hostile-suite.md.
#
# Sourced by test-builder-vm.sh, whose variables and helpers it uses (work, ns, out_addr,
# vm_network, api_port, node_agent, spawn, undo, wait_for, fail, say, mark, now_ms, s3, ...).
# The script calls, in order:
#   hostile_names          after its names and addresses: a namespace, link, VM network, node
#                          id and ports of its own (so it can run beside a plain run), the API on
#                          every host address, capacity for three VMs
#   hostile_targets_up     after the outside services: the targets and the control server
#   hostile_prepare_source builds the context: examples/hostile + the static attack tool
#   hostile_before_submit  submits the slow build, finds its VM, starts the watcher, and adds
#                          the targets' addresses to the hostile build's build args
#   hostile_after_submit   after the hostile build ended: releases and waits for the others,
#                          checks (b)-(g)
#   hostile_check_rootfs   on the rootfs read back from S3: check (a)
#   hostile_verdict        before the run's end: fails unless every check passed
# hostile_summary prints the table of checks whenever the script exits (also on failure).

# ---- ports and addresses of the targets ---------------------------------------------------------
hostile_lan_ns=bvt-hlan hostile_lan_link=bvt-hlanh
hostile_lan_host=10.252.0.1 hostile_lan_addr=10.252.0.10
hostile_meta_ns=bvt-hmeta hostile_meta_link=bvt-hmetah
hostile_meta_host=10.252.1.1 hostile_meta_peer=10.252.1.2
hostile_meta_addrs=(169.254.169.254 169.254.170.2 100.100.100.200)
hostile_route_table=252
hostile_dummy_link=bvt-hdummy hostile_dummy_addr=10.253.0.1
hostile_lo_port=17081 hostile_dummy_port=17082 hostile_any_port=17083 hostile_dnat_port=17089
hostile_dnat_to_port=8080
hostile_control_port=8092
hostile_vm_listen_port=7071
hostile_nft_table=bvt_hostile
hostile_comment=bvt-hostile
hostile_flood_count=${HOSTILE_FLOOD_COUNT:-2000}
hostile_healthz_max_s=${HOSTILE_HEALTHZ_MAX_S:-2}

declare -a hostile_checks=()
hostile_pass() { hostile_checks+=("PASS  $1: $2"); printf '  PASS  %s: %s\n' "$1" "$2"; }
hostile_fail() { hostile_checks+=("FAIL  $1: $2"); printf '  FAIL  %s: %s\n' "$1" "$2" >&2; }

hostile_summary() {
	((${#hostile_checks[@]})) || return 0
	printf '\n== hostile-build checks\n'
	printf '  %s\n' "${hostile_checks[@]}"
}

hostile_verdict() {
	local failed
	failed=$(printf '%s\n' "${hostile_checks[@]}" | grep -c '^FAIL' || true)
	((${#hostile_checks[@]})) || fail "hostile mode ran no check"
	((failed == 0)) || fail "$failed hostile-build check(s) failed (table above)"
}

# hostile_ip_add ADDR N: the IPv4 address N after ADDR.
hostile_ip_add() {
	local a b c d n
	IFS=. read -r a b c d <<<"$1"
	n=$(((a << 24 | b << 16 | c << 8 | d) + $2))
	printf '%d.%d.%d.%d\n' $((n >> 24 & 255)) $((n >> 16 & 255)) $((n >> 8 & 255)) $((n & 255))
}

hostile_names() {
	# Its own namespace, link, outside /30, VM network and node: a hostile run can go beside a
	# plain `make test-builder-vm`. The outside stands for the public Internet: a /30 at the end
	# of 198.18.0.0/15 (benchmarking, not private), which VMs may reach by default.
	ns=bvt-hout
	host_link=bvt-hhost
	host_addr=198.19.255.1
	out_addr=198.19.255.2
	vm_network=10.216.0.0/16
	vm_network_re='^10\.218\.'
	vm_network_prefix=SRC=10.216.
	node_id=test-builder-vm-hostile
	node_tag=bvm-$(printf '%s' "$node_id" | sha256sum | cut -c1-8)-
	api_port=17072
	# SeaweedFS names its Unix sockets in /tmp by port (/tmp/seaweedfs-master-grpc-19333.sock),
	# and its clients prefer them: two runs on the same ports in different namespaces talk to
	# each other's servers. Ports of its own (the last of a repeated flag wins).
	s3_port=8433
	weed_ports=(-master.port=9433 -master.port.grpc=19433 -volume.port=8180 -volume.port.grpc=18180
		-filer.port=8988 -filer.port.grpc=18988 -s3.port.grpc=18433)
	# The operator API and /metrics on every host address: the configuration that exposes the
	# most to a VM that gets past its firewall.
	api_listen=0.0.0.0
	# The slow build, the hostile one and the normal one at once.
	capacity_vcpus=3
	capacity_mem_mib=6144
}

# ---- targets ----------------------------------------------------------------------------------
# hostile_netns NAME LINK HOST_ADDR PEER_ADDR PREFIX: a namespace reached from the host over a veth.
hostile_netns() {
	local name=$1 link=$2 host=$3 peer=$4 prefix=$5
	ip netns list | grep -qw "^$name" && fail "network namespace $name exists: another run, or a crashed one (ip netns delete $name)"
	ip netns add "$name"
	undo+=("ip netns delete $name")
	ip link add "$link" type veth peer name eth0 netns "$name"
	undo+=("ip link delete $link 2>/dev/null")
	ip addr add "$host/$prefix" dev "$link"
	ip link set "$link" up
	ip -n "$name" addr add "$peer/$prefix" dev eth0
	ip -n "$name" link set lo up
	ip -n "$name" link set eth0 up
	ip -n "$name" route add default via "$host"
}

hostile_probe_ok() { # hostile_probe_ok [NETNS] URL: the target answers the suite's own probe
	if [[ $1 != http* ]]; then
		ip netns exec "$1" curl -sf --max-time 3 -o /dev/null "$2/bvt-probe"
	else
		curl -sf --max-time 3 -o /dev/null "$1/bvt-probe"
	fi
}

hostile_targets_up() {
	say "hostile targets: a private LAN, metadata services, host listeners, a published port, the control server"
	local t a
	t=$(now_ms)
	hostile_dir=$work/hostile
	mkdir -p "$hostile_dir/control/release" "$hostile_dir/config-drives"
	undo+=("hostile_summary")
	# A private LAN host (10.252.0.10): port 80 directly, 8080 behind the published port below.
	hostile_netns "$hostile_lan_ns" "$hostile_lan_link" "$hostile_lan_host" "$hostile_lan_addr" 24
	spawn hostile-lan ip netns exec "$hostile_lan_ns" python3 scripts/lib/hostile-target.py \
		--log "$hostile_dir/lan.jsonl" "lan=$hostile_lan_addr:80" "lan-published=$hostile_lan_addr:$hostile_dnat_to_port"
	# Metadata services: 169.254.169.254 (AWS, GCP, Azure, OpenStack), 169.254.170.2 (ECS),
	# 100.100.100.200 (Alibaba) in a namespace. Only traffic from the VM network is routed
	# there (policy routing), so the host's own metadata service, if it has one, is untouched.
	hostile_netns "$hostile_meta_ns" "$hostile_meta_link" "$hostile_meta_host" "$hostile_meta_peer" 30
	local meta_listeners=()
	for a in "${hostile_meta_addrs[@]}"; do
		ip -n "$hostile_meta_ns" addr add "$a/32" dev lo
		ip route add "$a/32" via "$hostile_meta_peer" dev "$hostile_meta_link" table "$hostile_route_table"
		meta_listeners+=("metadata-$a=$a:80")
	done
	ip rule add from "$vm_network" lookup "$hostile_route_table" priority 1000
	undo+=("ip rule del from $vm_network lookup $hostile_route_table priority 1000")
	ip rule add from "$hostile_meta_host/30" lookup "$hostile_route_table" priority 1001
	undo+=("ip rule del from $hostile_meta_host/30 lookup $hostile_route_table priority 1001")
	undo+=("ip route flush table $hostile_route_table")
	spawn hostile-meta ip netns exec "$hostile_meta_ns" python3 scripts/lib/hostile-target.py \
		--log "$hostile_dir/metadata.jsonl" "${meta_listeners[@]}"
	# The host's own listeners: loopback only, a dummy link's address only, every address.
	# (A veth pair whose both ends stay on the host: the dummy driver may not be there.)
	ip link add "$hostile_dummy_link" type veth peer name "${hostile_dummy_link}p"
	undo+=("ip link delete $hostile_dummy_link 2>/dev/null")
	ip addr add "$hostile_dummy_addr/32" dev "$hostile_dummy_link"
	ip link set "$hostile_dummy_link" up
	ip link set "${hostile_dummy_link}p" up
	spawn hostile-host python3 scripts/lib/hostile-target.py --log "$hostile_dir/host.jsonl" \
		"host-loopback=127.0.0.1:$hostile_lo_port" "host-dummy=$hostile_dummy_addr:$hostile_dummy_port" \
		"host-any=0.0.0.0:$hostile_any_port"
	# A Docker-style published port: DNAT of a host port to the LAN host, and the ACCEPT that
	# Docker puts on top of FORWARD for it.
	local dnat=(PREROUTING -p tcp --dport "$hostile_dnat_port" -m addrtype --dst-type LOCAL
		-m comment --comment "$hostile_comment" -j DNAT --to-destination "$hostile_lan_addr:$hostile_dnat_to_port")
	local fwd=(FORWARD -d "$hostile_lan_addr/32" -p tcp --dport "$hostile_dnat_to_port"
		-m comment --comment "$hostile_comment" -j ACCEPT)
	iptables -t nat -I "${dnat[@]}"
	undo+=("iptables -t nat -D ${dnat[*]}")
	iptables -I "${fwd[@]}"
	undo+=("iptables -D ${fwd[*]}")
	# The control server in the outside namespace (the public Internet): the flood and the slow
	# build poll /release/NAME, the flood announces /flood-started.
	spawn hostile-control ip netns exec "$ns" python3 scripts/lib/hostile-target.py \
		--log "$hostile_dir/control.jsonl" --release-dir "$hostile_dir/control/release" \
		"control=$out_addr:$hostile_control_port"
	# What reached the host's sockets (input, after the filter chains) and what the host
	# forwarded (forward, after them), from the VM network: new connections by source,
	# destination, protocol and port. Counting only; priority 100 runs after every filter
	# chain, so a packet dropped there is never seen here.
	nft -f - <<-EOF
		table ip $hostile_nft_table {
		  set seen_in { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags dynamic; size 65536; counter; }
		  set seen_fwd { type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags dynamic; size 65536; counter; }
		  set seen_icmp { type ipv4_addr . ipv4_addr; flags dynamic; size 65536; counter; }
		  chain input {
		    type filter hook input priority 100; policy accept;
		    ip saddr $vm_network ct state new meta l4proto { tcp, udp } add @seen_in { ip saddr . ip daddr . meta l4proto . th dport }
		    ip saddr $vm_network ct state new meta l4proto icmp add @seen_icmp { ip saddr . ip daddr }
		    ip saddr $vm_network ct state new tcp dport != $hostile_vm_listen_port log prefix "bvt-hostile in: "
		  }
		  chain forward {
		    type filter hook forward priority 100; policy accept;
		    ip saddr $vm_network ct state new meta l4proto { tcp, udp } add @seen_fwd { ip saddr . ip daddr . meta l4proto . th dport }
		    ip saddr $vm_network ct state new meta l4proto icmp add @seen_icmp { ip saddr . ip daddr }
		    ip saddr $vm_network ip daddr != $out_addr ct state new log prefix "bvt-hostile fwd: "
		  }
		}
	EOF
	undo+=("nft delete table ip $hostile_nft_table 2>/dev/null")
	wait_for 20 "the LAN target" hostile_probe_ok "$hostile_lan_ns" "http://$hostile_lan_addr:80"
	wait_for 20 "the published-port target" hostile_probe_ok "$hostile_lan_ns" "http://$hostile_lan_addr:$hostile_dnat_to_port"
	for a in "${hostile_meta_addrs[@]}"; do
		wait_for 20 "the metadata target $a" hostile_probe_ok "$hostile_meta_ns" "http://$a:80"
	done
	wait_for 20 "the loopback target" hostile_probe_ok "http://127.0.0.1:$hostile_lo_port"
	wait_for 20 "the dummy-link target" hostile_probe_ok "http://$hostile_dummy_addr:$hostile_dummy_port"
	wait_for 20 "the any-address target" hostile_probe_ok "http://127.0.0.1:$hostile_any_port"
	wait_for 20 "the control server" bash -c "exec 3<>/dev/tcp/$out_addr/$hostile_control_port"
	mark "hostile targets up" "$t"
}

# ---- the builds -------------------------------------------------------------------------------
# The hostile build's context: examples/hostile as it is on disk plus the static attack tool.
hostile_prepare_source() {
	local src=$1 t
	t=$(now_ms)
	rm -rf "$hostile_dir/src"
	cp -r "$src" "$hostile_dir/src"
	rm -f "$hostile_dir/src/.gitignore" # it keeps the compiled tool out of git, not out of the context
	if [[ ! -e /usr/lib/x86_64-linux-gnu/libc.a ]] || ! command -v gcc >/dev/null; then
		bt_apt_install gcc libc6-dev
	fi
	gcc -static -O2 -Wall -o "$hostile_dir/src/hostile" "$src/hostile.c" ||
		fail "cannot compile $src/hostile.c (gcc -static: libc6-dev)"
	source_args=("$hostile_dir/src")
	mark "hostile context (gcc -static)" "$t"
}

hostile_api() { # hostile_api PATH: GET on the node's API with the token
	curl -sf --max-time 10 -H "Authorization: Bearer $(cat "$work/node/api-token")" \
		"http://127.0.0.1:$api_port$1"
}
hostile_state() { hostile_api "/v1/builds/$1" | jq -r .state; }
hostile_terminal() { [[ $(hostile_state "$1") =~ ^(succeeded|failed|timed_out|cancelled)$ ]]; }

# hostile_vm_cmdline BUILD_ID: the kernel command line of the build's VM (its VMM's -append).
hostile_vm_cmdline() {
	local pid
	for pid in $(pgrep -f 'qemu-system|firecracker' || true); do
		tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -m1 -- "build_id=$1\b" && return 0
	done
	return 1
}

hostile_submit() { # hostile_submit NAME DIR [ARGS...]: submits without waiting, prints the id
	local name=$1 dir=$2
	shift 2
	"$node_agent" submit "$dir" --snapshot --server "http://127.0.0.1:$api_port" \
		--token-file "$work/node/api-token" --s3-bucket "$s3_bucket" \
		--s3-key "test-builder-vm-hostile/$(date +%s)-$$-$name.ext4" \
		--vcpus 1 --mem-mib 2048 --disk-gib 4 --timeout-s 1500 "$@" >"$hostile_dir/$name.submit" 2>"$hostile_dir/$name.submit.err" ||
		fail "node-agent submit $dir failed: $(cat "$hostile_dir/$name.submit.err")"
	head -n1 "$hostile_dir/$name.submit"
}

hostile_before_submit() {
	say "hostile: the other tenant's slow build, then the hostile build beside it"
	local t cmdline other_guest other_listener host_addrs a
	t=$(now_ms)
	hostile_slow_id=$(hostile_submit slow "$hostile_dir/src/slow" \
		--build-arg "CONTROL=$out_addr:$hostile_control_port")
	[[ $hostile_slow_id =~ ^[A-Za-z0-9_-]+$ ]] || fail "submitting the slow build failed: $(cat "$hostile_dir/slow.submit.err")"
	echo "slow build: $hostile_slow_id"
	local deadline=$((SECONDS + 300)) running_since=''
	until cmdline=$(hostile_vm_cmdline "$hostile_slow_id"); do
		((SECONDS < deadline)) || fail "the slow build's VM did not start within 300 s (state $(hostile_state "$hostile_slow_id"))"
		# A VMM without the kernel command line in its argv (Firecracker: it is set over the
		# API): the slow VM is the only one, so its address is the one host veth of the network.
		if [[ $(hostile_state "$hostile_slow_id") == running ]]; then
			running_since=${running_since:-$SECONDS}
			if ((SECONDS - running_since > 10)); then
				a=$(ip -o -4 addr show | awk '{print $4}' | cut -d/ -f1 | grep -E "$vm_network_re" | head -n1)
				[[ -n $a ]] && cmdline="ip=$(hostile_ip_add "$a" 5)::" && break
			fi
		fi
		sleep 1
	done
	other_guest=$(grep -o '\bip=[0-9.]*' <<<"$cmdline" | head -n1 | cut -d= -f2)
	other_listener=$(grep -o 'notify_url=[^ ]*' <<<"$cmdline" | sed 's/%3[Aa]/:/g; s/%2[Ff]/\//g' |
		sed -n 's|^notify_url=https\{0,1\}://\([^/]*\)/.*|\1|p')
	if [[ -z $other_listener ]]; then # from the /29: the host end is the guest's address - 5
		other_listener=$(hostile_ip_add "$other_guest" -5):$hostile_vm_listen_port
	fi
	[[ -n $other_guest ]] || fail "cannot read the slow build's guest address from its VMM's command line"
	echo "slow build's VM: guest $other_guest, its listener $other_listener"
	hostile_other_guest=$other_guest hostile_other_listener=$other_listener
	# Every IPv4 address of the host except loopback and the VM network's (the hostile VM's own
	# listener address it finds itself, the other VM's listener is named apart).
	host_addrs=$(ip -o -4 addr show | awk '{print $4}' | cut -d/ -f1 | grep -v '^127\.' |
		grep -Ev "$vm_network_re" | tr '\n' ' ')
	host_addrs=${host_addrs% }
	echo "host addresses: $host_addrs"
	submit_extra+=(
		"--build-arg=CONTROL=$out_addr:$hostile_control_port"
		"--build-arg=LAN_ADDRS=$hostile_lan_addr:80"
		"--build-arg=HOST_ADDRS=$host_addrs"
		"--build-arg=HOST_PORTS=$api_port $hostile_lo_port $hostile_dummy_port $hostile_any_port $hostile_dnat_port 22 7070"
		"--build-arg=OTHER_GUEST=$other_guest"
		"--build-arg=OTHER_LISTENER=$other_listener"
		"--build-arg=VM_LISTEN_PORT=$hostile_vm_listen_port"
		"--build-arg=FLOOD_COUNT=$hostile_flood_count"
	)
	mark "slow build's VM up" "$t"
	(hostile_watch) >"$hostile_dir/watch.log" 2>&1 &
	hostile_watch_pid=$!
	undo+=("hostile_stop_watch")
}

hostile_stop_watch() {
	[[ -n ${hostile_watch_pid:-} ]] || return 0
	touch "$hostile_dir/watch.stop"
	for _ in $(seq 100); do kill -0 "$hostile_watch_pid" 2>/dev/null || break; sleep 0.1; done
	kill "$hostile_watch_pid" 2>/dev/null || true
	hostile_watch_pid=
}

# hostile_vmm_status PID: one line on a VMM process of this node: its VM's name, uid, gid,
# seccomp mode, no_new_privs, and which of its VM's files and directories under the node's work
# dir (the config drive, the jail) that uid could write (`-` when none).
hostile_vmm_status() {
	local pid=$1 name uid gid seccomp nnp path writable=() checked=0
	name=$(tr '\0' '\n' <"/proc/$pid/cmdline" | grep -A1 -x -- '-name' | tail -n1)
	uid=$(awk '/^Uid:/ {print $2}' "/proc/$pid/status")
	gid=$(awk '/^Gid:/ {print $2}' "/proc/$pid/status")
	seccomp=$(awk '/^Seccomp:/ {print $2}' "/proc/$pid/status")
	nnp=$(awk '/^NoNewPrivs:/ {print $2}' "/proc/$pid/status")
	[[ -n $name ]] || return 0
	while read -r path; do
		# The scratch disk is the VM's to write; everything else of it is not.
		[[ $path == */scratch*.ext4 ]] && continue
		checked=$((checked + 1))
		setpriv --reuid="$uid" --regid="$gid" --clear-groups test -w "$path" && writable+=("${path#"$work"/node/}")
	done < <(find "$work/node" -path "*$name*" \( -type d -o -name 'config*.ext4' \) 2>/dev/null)
	echo "$pid $name uid=$uid gid=$gid seccomp=$seccomp no_new_privs=$nnp writable=${writable[*]:--} (of $checked)"
}

# The watcher (a background subshell while the hostile build runs): keeps a copy of every config
# drive the node writes; when the flood has started, submits a normal build and samples
# /healthz until it ends, then releases the flood.
hostile_watch() {
	set +e # a failed step here is recorded, never the end of the watcher
	local f copy normal_pid='' started=false sample rc
	while [[ ! -e $hostile_dir/watch.stop ]]; do
		while read -r f; do
			copy=$hostile_dir/config-drives/$(printf '%s' "${f#"$work"/node/}" | tr '/' '_')
			# (An empty file is a mount point in a VMM's jail: the drive itself is beside it.)
			[[ -e $copy || ! -s $f ]] || { cp --sparse=always "$f" "$copy" 2>/dev/null && echo "config drive: $f"; }
		done < <(find "$work/node" -name 'config*.ext4' 2>/dev/null)
		# The VMMs' command lines (the kernel's included) and who they run as.
		for f in $(pgrep -f 'qemu-system|firecracker' || true); do
			grep -qF -e "$work/" -e "$node_tag" "/proc/$f/cmdline" 2>/dev/null || continue
			[[ -e $hostile_dir/vmm-$f.cmdline ]] && continue
			tr '\0' ' ' <"/proc/$f/cmdline" >"$hostile_dir/vmm-$f.cmdline" 2>/dev/null
			echo "VMM pid $f runs as uid $(stat -c %u "/proc/$f")"
			hostile_vmm_status "$f" >>"$hostile_dir/vmm-status.txt" 2>/dev/null || true
		done
		if [[ ! -e $hostile_dir/forged.ms ]] && grep -q '"path": "/forged-progress' "$hostile_dir/control.jsonl" 2>/dev/null; then
			now_ms >"$hostile_dir/forged.ms"
			echo "the build printed its forged progress lines"
		fi
		if ! $started && grep -q '"path": "/flood-started' "$hostile_dir/control.jsonl" 2>/dev/null; then
			started=true
			now_ms >"$hostile_dir/flood-started.ms"
			ss -Htn state established "( sport = :$hostile_vm_listen_port )" | wc -l >"$hostile_dir/flood-established.start"
			echo "flood started: $(grep -m1 '"path": "/flood-started' "$hostile_dir/control.jsonl" | jq -r .path)"
			"$node_agent" submit examples/hello --server "http://127.0.0.1:$api_port" \
				--token-file "$work/node/api-token" --s3-bucket "$s3_bucket" \
				--s3-key "test-builder-vm-hostile/$(date +%s)-$$-normal.ext4" \
				--vcpus 1 --mem-mib 2048 --disk-gib 4 --timeout-s 900 --wait \
				>"$hostile_dir/normal.out" 2>"$hostile_dir/normal.err" &
			normal_pid=$!
		fi
		if [[ -n $normal_pid ]]; then
			sample=$(curl -s -o /dev/null -w '%{http_code} %{time_total}' --max-time 10 \
				"http://127.0.0.1:$api_port/healthz" || true)
			echo "$(now_ms) ${sample:-000 10}" >>"$hostile_dir/healthz.txt"
			ss -Htn state established "( sport = :$hostile_vm_listen_port )" | wc -l >>"$hostile_dir/flood-established.samples"
			if ! kill -0 "$normal_pid" 2>/dev/null; then
				wait "$normal_pid"
				rc=$?
				echo "$rc" >"$hostile_dir/normal.exit"
				normal_pid=''
				now_ms >"$hostile_dir/flood-released.ms"
				touch "$hostile_dir/control/release/flood"
				echo "normal build ended (exit $(cat "$hostile_dir/normal.exit")): flood released"
			fi
		fi
		sleep 1
	done
	[[ -z $normal_pid ]] || kill "$normal_pid" 2>/dev/null || true
}

# ---- the checks -------------------------------------------------------------------------------
# Elements of a counting set as lines "SADDR DADDR PROTO PORT PACKETS".
hostile_seen() {
	nft -j list set ip "$hostile_nft_table" "$1" 2>/dev/null |
		jq -r '.nftables[] | select(.set) | .set.elem // [] | .[] |
			(.elem // {val: .}) as $e | [($e.val.concat // [])[], ($e.counter.packets // "-")] | map(tostring) | join(" ")'
}

# The kernel's log lines of the counting table's leak rules (when, which interfaces), this run's.
hostile_kernel_log() {
	dmesg -T 2>/dev/null | grep 'bvt-hostile \(in\|fwd\): ' | grep -F "$vm_network_prefix" | tail -n 20 |
		sed 's/^/    kernel: /' || true
}

hostile_target_hits() { # hostile_target_hits LOG: the requests other than the suite's probes
	[[ -f $1 ]] || return 0
	jq -c 'select(.path != "/bvt-probe")' "$1"
}

hostile_after_submit() {
	local hostile_id=$1 t
	say "hostile: the other builds, then the checks from the outside"
	t=$(now_ms)
	# The normal build ran during the flood; the slow one is released now.
	local deadline=$((SECONDS + 900))
	while [[ ! -e $hostile_dir/normal.exit && -e $hostile_dir/flood-started.ms ]]; do
		((SECONDS < deadline)) || break
		kill -0 "$hostile_watch_pid" 2>/dev/null || break
		sleep 2
	done
	touch "$hostile_dir/control/release/slow" "$hostile_dir/control/release/flood"
	deadline=$((SECONDS + 900))
	until hostile_terminal "$hostile_slow_id"; do
		((SECONDS < deadline)) || break
		sleep 2
	done
	hostile_stop_watch
	mark "other builds ended" "$t"
	hostile_api "/v1/builds/$hostile_id" >"$hostile_dir/hostile-build.json" || true
	hostile_api "/v1/builds/$hostile_slow_id" >"$hostile_dir/slow-build.json" || true
	hostile_normal_id=$(head -n1 "$hostile_dir/normal.out" 2>/dev/null || true)
	[[ $hostile_normal_id =~ ^[A-Za-z0-9_-]+$ ]] &&
		hostile_api "/v1/builds/$hostile_normal_id" >"$hostile_dir/normal-build.json" || true
	cat "$hostile_dir/watch.log" | sed 's/^/  watch: /'

	say "hostile checks (b) targets, (c) other VM, (d) config drive, (e) recorded state, (f) flood"
	hostile_check_targets
	hostile_check_other_vm
	hostile_check_config_drives
	hostile_check_state "$hostile_id"
	hostile_check_flood "$hostile_id"
	hostile_check_vmm
}

# (b) The targets saw nothing from the VM.
hostile_check_targets() {
	local log name hits n leaks own_ok
	for log in lan metadata host; do
		hits=$(hostile_target_hits "$hostile_dir/$log.jsonl" || true)
		n=$(grep -c . <<<"$hits" || true)
		if ((n == 0)); then
			hostile_pass "b/$log" "0 requests reached the $log target(s) ($(jq -r .listener "$hostile_dir/$log.jsonl" 2>/dev/null | sort -u | tr '\n' ' '))"
		else
			hostile_fail "b/$log" "$n request(s) reached them: $(jq -r '"\(.listener) \(.method) \(.path) from \(.client)"' <<<"$hits" | sort | uniq -c | head -n 8 | tr -s ' ' | tr '\n' ';')"
		fi
	done
	# Connections that reached the host's own sockets from the VM network. Allowed: a VM to its
	# own listener (the host end of its own veth, source - 1, on the VM port). Anything else,
	# the operator API first, is a leak.
	hostile_seen seen_in >"$hostile_dir/seen-in.txt"
	hostile_seen seen_fwd >"$hostile_dir/seen-fwd.txt"
	hostile_seen seen_icmp >"$hostile_dir/seen-icmp.txt"
	own_ok=0
	leaks=()
	while read -r src dst proto port packets; do
		[[ -n $src ]] || continue
		if [[ $port == "$hostile_vm_listen_port" && $dst == "$(hostile_ip_add "$src" -1)" ]]; then
			own_ok=$((own_ok + 1))
		else
			leaks+=("$src→$dst $proto/$port ($packets packets)")
		fi
	done <"$hostile_dir/seen-in.txt"
	n=$(awk -v p="$api_port" '$4 == p' "$hostile_dir/seen-in.txt" | wc -l)
	if ((n == 0)); then
		hostile_pass "b/operator-api" "no connection from the VM network reached the node's API port $api_port on any host address"
	else
		hostile_fail "b/operator-api" "$(awk -v p="$api_port" '$4 == p {print $1 "→" $2 " (" $5 " packets)"}' "$hostile_dir/seen-in.txt" | tr '\n' ' ')"
	fi
	if ((${#leaks[@]} == 0)); then
		hostile_pass "b/host-sockets" "only VMs' own listeners were reached on the host ($own_ok VM→own-listener flows)"
	else
		hostile_fail "b/host-sockets" "reached the host: ${leaks[*]}"
		hostile_kernel_log
	fi
	# Forwarded by the host: only to the outside namespace (S3, control server, DNS).
	leaks=()
	while read -r src dst proto port packets; do
		[[ -n $src ]] || continue
		[[ $dst == "$out_addr" ]] && continue
		leaks+=("$src→$dst $proto/$port ($packets packets)")
	done <"$hostile_dir/seen-fwd.txt"
	if ((${#leaks[@]} == 0)); then
		hostile_pass "b/forwarded" "the host forwarded VM traffic only to the outside namespace $out_addr"
	else
		hostile_fail "b/forwarded" "forwarded elsewhere: ${leaks[*]}"
		hostile_kernel_log
	fi
}

# (c) The other VM: nothing from another VM reached its address or its listener.
hostile_check_other_vm() {
	local other_host=${hostile_other_listener%:*} n
	n=$(awk -v g="$hostile_other_guest" -v h="$other_host" '($2 == g || $2 == h)' \
		"$hostile_dir/seen-fwd.txt" "$hostile_dir/seen-icmp.txt" | wc -l)
	n=$((n + $(awk -v h="$other_host" -v p="$hostile_vm_listen_port" '$2 == h && $4 == p' "$hostile_dir/seen-in.txt" |
		while read -r src dst _; do [[ $dst == "$(hostile_ip_add "$src" -1)" ]] || echo x; done | wc -l)))
	if ((n == 0)); then
		hostile_pass "c/other-vm" "nothing reached the other VM's guest $hostile_other_guest or its listener $hostile_other_listener from another VM"
	else
		hostile_fail "c/other-vm" "$n flow(s) reached the other VM (see $hostile_dir/seen-*.txt)"
	fi
	if [[ $(jq -r .state "$hostile_dir/slow-build.json" 2>/dev/null) == succeeded ]]; then
		hostile_pass "c/other-build" "the other tenant's build $hostile_slow_id succeeded"
	else
		hostile_fail "c/other-build" "the other tenant's build $hostile_slow_id ended $(jq -r '.state + ": " + (.error.message // "")' "$hostile_dir/slow-build.json" 2>/dev/null | head -c 300)"
	fi
}

# (d) The config drives the node wrote hold no S3 key.
hostile_check_config_drives() {
	local drive n=0 bad=() json keys
	for drive in "$hostile_dir"/config-drives/*; do
		[[ -f $drive ]] || continue
		n=$((n + 1))
		json=$(debugfs -R 'cat /secrets.json' "$drive" 2>/dev/null || true)
		keys=$(jq -c '[paths(scalars) | map(tostring) | join(".")]' <<<"$json" 2>/dev/null || echo '?')
		echo "  $(basename "$drive"): secrets.json keys $keys"
		if grep -qaF -- "$s3_secret" "$drive"; then
			bad+=("$(basename "$drive") holds the node's S3 secret key")
		elif grep -q 'secret_access_key' <<<"$json"; then
			bad+=("$(basename "$drive") has a secret_access_key")
		fi
	done
	for drive in "$hostile_dir"/vmm-*.cmdline; do
		[[ -f $drive ]] || continue
		! grep -qF -- "$s3_secret" "$drive" || bad+=("the VMM command line $(basename "$drive") holds the node's S3 secret key")
	done
	if ((n == 0)); then
		hostile_fail "d/config-drive" "no config drive was seen under $work/node while the builds ran"
	elif ((${#bad[@]} == 0)); then
		hostile_pass "d/config-drive" "none of the $n config drives holds an S3 secret key (not its bytes, no secret_access_key), nor any VMM command line"
	else
		hostile_fail "d/config-drive" "${bad[*]}"
	fi
}

# (h) The VMMs: not root, under seccomp, and their config drive and jail not writable by them.
hostile_check_vmm() {
	local lines bad
	lines=$(cat "$hostile_dir/vmm-status.txt" 2>/dev/null || true)
	sed 's/^/  VMM /' <<<"$lines"
	if [[ -z $lines ]]; then
		hostile_fail "h/vmm" "no VMM process of this node was seen"
		return
	fi
	bad=$(grep -v ' uid=[1-9][0-9]* gid=[0-9]* seccomp=2 no_new_privs=1 writable=- (of [1-9][0-9]*)$' <<<"$lines" || true)
	if [[ -z $bad ]]; then
		hostile_pass "h/vmm" "all $(grep -c . <<<"$lines") VMMs ran as non-root uids, with a seccomp filter and no_new_privs, and none could write its config drive or jail"
	else
		hostile_fail "h/vmm" "$(tr '\n' ';' <<<"$bad")"
	fi
}

# (e) The recorded states are the true ones: the same sequence as the normal build's, no upload
# before the hostile build's last RUN ended (the flood release), no panic.
hostile_check_state() {
	local id=$1 build=$hostile_dir/hostile-build.json normal=$hostile_dir/normal-build.json seq ref released early panic forged uploading
	seq=$(jq -r '[.events[].to_state] | join(" ")' "$build" 2>/dev/null || true)
	ref=$(jq -r '[.events[].to_state] | join(" ")' "$normal" 2>/dev/null || true)
	echo "  hostile build events: $(jq -r '[.events[] | "\(.to_state) (\(.detail // "" | .[0:60]))"] | join(" → ")' "$build" 2>/dev/null || true)"
	if [[ -n $seq && $seq == "$ref" ]]; then
		hostile_pass "e/states" "the hostile build went through exactly the normal build's states: $seq"
	else
		hostile_fail "e/states" "hostile: '$seq', normal build: '${ref:-none}'"
	fi
	released=$(cat "$hostile_dir/flood-released.ms" 2>/dev/null || echo 0)
	forged=$(cat "$hostile_dir/forged.ms" 2>/dev/null || echo 0)
	uploading=$(jq -r '[.events[] | select(.to_state == "uploading") | .at_ms] | first // 0' "$build" 2>/dev/null || echo 0)
	if ((released == 0)); then
		hostile_fail "e/no-early-upload" "the flood was never released, so when the build left its RUN steps is unknown"
	elif ((forged == 0)); then
		hostile_fail "e/no-early-upload" "the build never announced its forged progress lines (see its build log)"
	else
		early=$(jq -r --argjson r "$released" '[.events[] | select(.to_state == "uploading" and .at_ms < $r)] | length' "$build" || true)
		if [[ $early == 0 ]]; then
			hostile_pass "e/no-early-upload" "the forged '==> upload' lines were printed $(((released - forged) / 1000)) s before the RUN steps ended (the flood's release); 'uploading' came $(((uploading - released) / 1000)) s after it"
		else
			hostile_fail "e/no-early-upload" "the build was 'uploading' $(jq -r --argjson r "$released" '[.events[] | select(.to_state == "uploading") | ($r - .at_ms) / 1000 | floor] | map(tostring) | join(", ")' "$build") s before its RUN steps ended: the forged progress lines moved it"
		fi
	fi
	panic=$(jq -r '[.events[].detail // "", .error.message // ""] | map(select(test("panic"; "i"))) | join("; ")' "$build" 2>/dev/null || true)
	if [[ -z $panic && $(jq -r .state "$build") == succeeded && $(jq -r '.vmm_exit_code // 0' "$build") == 0 ]] &&
		! grep "$id" "$work/node-agent.log" 2>/dev/null | grep -qi 'panick'; then
		hostile_pass "e/no-panic" "succeeded, VMM exit 0, no event or node log line calls the forged panic a panic"
	else
		hostile_fail "e/no-panic" "state $(jq -r .state "$build"), VMM exit $(jq -r '.vmm_exit_code // "-"' "$build"), panic in: ${panic:-the node log}"
	fi
	# The console: the build's output is in it, but marked as the build's; only the agent's own
	# line says `==> upload`, no raw escape reaches it, no line looks like the kernel's panic.
	local console=$work/node/logs/$id.log agent forged
	agent=$(grep -acE '^\[ *[0-9.]+s\] ==> upload'$'\r''?$' "$console" || true)
	forged=$(grep -acE '\| .*==> upload' "$console" || true)
	if [[ ! -s $console ]]; then
		hostile_fail "e/console" "no console log at $console"
	elif [[ $agent == 1 && $forged -ge 1 ]] && ! grep -aq $'\x1b' "$console" &&
		! grep -aqE '^\[ *[0-9]+\.[0-9]+\] Kernel panic' "$console"; then
		hostile_pass "e/console" "the console has one agent '==> upload' line; the build's $forged forged ones are marked as its output, its escape sequence is escaped, its panic line is not the kernel's"
	else
		hostile_fail "e/console" "agent-shaped '==> upload' lines: $agent (1 expected), the build's marked ones: $forged, raw ESC: $(grep -ac $'\x1b' "$console" || true), kernel-shaped panic lines: $(grep -acE '^\[ *[0-9]+\.[0-9]+\] Kernel panic' "$console" || true)"
	fi
	if [[ $(jq -r '.rootfs.location // ""' "$build") == "s3://$s3_bucket/$s3_key" ]]; then
		hostile_pass "e/report" "the recorded rootfs is the real one (the forged report's s3://forged-bucket was not taken)"
	else
		hostile_fail "e/report" "the recorded rootfs is $(jq -r '.rootfs.location // "none"' "$build")"
	fi
}

# (f) The flood: a normal build submitted meanwhile succeeded and /healthz answered in time.
hostile_check_flood() {
	local started max bad n held
	if [[ ! -e $hostile_dir/flood-started.ms ]]; then
		hostile_fail "f/flood" "the hostile build never announced its flood (see its build log)"
		return
	fi
	held=$(sort -n "$hostile_dir/flood-established.samples" 2>/dev/null | tail -n1)
	echo "  host-side connections established on port $hostile_vm_listen_port: ${held:-?} at most while the normal build ran ($(cat "$hostile_dir/flood-established.start" 2>/dev/null || echo ?) when the flood was announced)"
	if [[ $(cat "$hostile_dir/normal.exit" 2>/dev/null) == 0 && $(jq -r .state "$hostile_dir/normal-build.json" 2>/dev/null) == succeeded ]]; then
		hostile_pass "f/normal-build" "a normal build submitted during the flood succeeded ($hostile_normal_id, $(jq -r '(.timings.duration_ms // 0) / 1000' "$hostile_dir/normal-build.json") s)"
	else
		hostile_fail "f/normal-build" "the normal build during the flood: exit $(cat "$hostile_dir/normal.exit" 2>/dev/null || echo none), $(tail -n 3 "$hostile_dir/normal.out" "$hostile_dir/normal.err" 2>/dev/null | tr '\n' ' ')"
	fi
	n=$(wc -l <"$hostile_dir/healthz.txt" 2>/dev/null || echo 0)
	max=$(awk '{print $3}' "$hostile_dir/healthz.txt" 2>/dev/null | sort -g | tail -n1)
	bad=$(awk -v m="$hostile_healthz_max_s" '$2 != 200 || $3 > m' "$hostile_dir/healthz.txt" 2>/dev/null | wc -l)
	if ((n > 0 && bad == 0)); then
		hostile_pass "f/healthz" "$n /healthz answers during the flood, all 200, slowest ${max} s (bound ${hostile_healthz_max_s} s)"
	else
		hostile_fail "f/healthz" "$bad of $n /healthz samples failed or took over ${hostile_healthz_max_s} s (slowest ${max:-?} s)"
	fi
}

# (a) The results the hostile build wrote into its image: every attempt blocked, none missing.
hostile_check_rootfs() {
	local rootfs=$1 results reached required name missing=()
	results=$(debugfs -R 'cat /hostile/results.txt' "$rootfs" 2>/dev/null | grep -v '^#' | grep . || true)
	printf '%s\n' "$results" >"$hostile_dir/results.txt"
	say "hostile: /hostile/results.txt of the uploaded rootfs"
	sed 's/^/  /' "$hostile_dir/results.txt"
	if [[ -z $results ]]; then
		hostile_fail "a/results" "the rootfs has no /hostile/results.txt"
		return
	fi
	required=(metadata-169.254.169.254 metadata-100.100.100.200 metadata-169.254.170.2 metadata-fd00:ec2::254 "lan-$hostile_lan_addr:80"
		"host-$hostile_dummy_addr:$hostile_dummy_port" "host-$hostile_dummy_addr:$api_port"
		"host-$hostile_dummy_addr:$hostile_dnat_port" other-vm-ping other-vm-listener
		"other-vm-$hostile_other_guest:22" listener-metrics listener-v1 dev-nodes dev-cat-vdc
		dev-read-vdc dev-mount-vdc mount-table cmdline-secrets forged-report forged-log
		forged-event-progress io-uring flood)
	for name in "${required[@]}"; do
		grep -q "^$name " <<<"$results" || missing+=("$name")
	done
	reached=$(grep -v '^[^ ]* blocked ' <<<"$results" || true)
	if [[ -n $reached ]]; then
		hostile_fail "a/results" "$(grep -c . <<<"$reached") attempt(s) not blocked: $(awk '{print $1}' <<<"$reached" | tr '\n' ' ')"
	else
		hostile_pass "a/results" "all $(grep -c . <<<"$results") attempts blocked"
	fi
	if ((${#missing[@]})); then
		hostile_fail "a/attempts" "missing from the results (the attempt did not run): ${missing[*]}"
	else
		hostile_pass "a/attempts" "every required attempt ran (${#required[@]} names)"
	fi
	# (g) io_uring: refused to the build, and by which layer.
	local uring kernel
	uring=$(grep '^io-uring ' <<<"$results" || true)
	if grep -qx '# CONFIG_IO_URING is not set' build/vms/vmlinux.config 2>/dev/null; then
		kernel="the guest kernel has no io_uring (CONFIG_IO_URING unset)"
	else
		kernel="the guest kernel HAS io_uring (only the container's seccomp stands in the way)"
	fi
	if [[ $uring == "io-uring blocked "* ]]; then
		hostile_pass "g/io-uring" "${uring#io-uring blocked }; $kernel"
	else
		hostile_fail "g/io-uring" "${uring:-no io-uring result}; $kernel"
	fi
	local line
	for line in io-uring flood; do
		grep "^$line " <<<"$results" | sed "s/^/  $line: /" || true
	done
}
