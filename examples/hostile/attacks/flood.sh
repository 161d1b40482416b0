#!/bin/sh
# Thousands of TCP connections to the node's listener for this VM (the host end of its veth),
# held until the suite has run a normal build beside them (it releases the flood through the
# control server in its "outside" namespace) or FLOOD_MAX_HOLD_S.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
listener=$(own_listener)
if [ -z "$CONTROL" ]; then
	record "flood blocked not run: no CONTROL server given"
	exit 0
fi
$hostile flood flood "$listener" "${FLOOD_COUNT:-2000}" "$CONTROL" "${FLOOD_MAX_HOLD_S:-600}" | tee -a "$results"
exit 0
