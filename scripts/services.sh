#!/usr/bin/env bash
# Starts, stops and describes the test services (dockerd, SeaweedFS S3, git daemon, private git
# over HTTP, private registry, base image); see scripts/lib/services.sh. For running single tests by hand:
#   sudo scripts/services.sh start && eval "$(scripts/services.sh env)" && cargo test -p builder-agent
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/services.sh"

usage() {
	cat >&2 <<-EOF
		usage: $0 start [--no-s3] | stop | status | env | purge
		  start   install what is missing, start the services (they stay up until stop)
		  stop    stop them; no process is left behind
		  status  say which are running
		  env     print the export lines tests read: eval "\$($0 env)"
		  purge   stop them and delete their state and data ($BT_STATE, $BT_DATA)
	EOF
	exit 2
}

case ${1:-} in
start)
	bt_require_root "$0"
	bt_ensure_deps
	bt_start_all "${2:---with-s3}"
	touch "$BT_STATE/manual"
	bt_log "ready; run: eval \"\$($0 env)\""
	;;
stop)
	bt_require_root "$0"
	bt_stop_all
	;;
status)
	for name in dockerd weed git-daemon git-http registry; do
		if pid=$(bt_pid "$name"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
	done
	;;
env)
	bt_pid dockerd >/dev/null || bt_log "warning: the services are not running (start them: sudo $0 start)"
	bt_env
	;;
purge)
	bt_require_root "$0"
	bt_stop_all
	rm -rf "$BT_STATE" "$BT_DATA"
	;;
*) usage ;;
esac
