# Shared by the attack steps (busybox sh). Every step appends `NAME blocked|REACHED detail`
# lines to /hostile/results.txt and exits 0.
# shellcheck disable=SC2034 # used by the steps that source this
results=/hostile/results.txt
# shellcheck disable=SC2034
hostile=/hostile/bin/hostile
record() { echo "$*" | tee -a "$results"; }

# A kernel command-line parameter of the VM (percent-decoded): every process in the VM can read
# /proc/cmdline, which is how a build learns its build id, report URL and network.
cmdline_param() {
	for word in $(cat /proc/cmdline); do
		case $word in
		"$1"=*) printf '%s\n' "${word#*=}" | sed 's/%3[Aa]/:/g; s/%2[Ff]/\//g; s/%25/%/g' ;;
		esac
	done
}
build_id() { cmdline_param build_id; }
# The VM's listener (host end of its veth): from the report URL, else the gateway (the TAP,
# host end + 4 in the VM's /29).
own_listener() {
	url=$(cmdline_param notify_url)
	hostport=$(printf '%s' "$url" | sed -n 's|^https\{0,1\}://\([^/]*\)/.*|\1|p')
	if [ -n "$hostport" ]; then
		echo "$hostport"
		return
	fi
	gw=$(cmdline_param ip | cut -d: -f3)
	[ -n "$gw" ] || return 1
	last=${gw##*.}
	echo "${gw%.*}.$((last - 4)):${VM_LISTEN_PORT:-7071}"
}
