#!/bin/sh
# What a build can reach. A TCP connection that is established is REACHED, whatever answers;
# a timeout, a refusal or an unreachable route is blocked. The suite counts from the outside
# what arrived at each target.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
listener=$(own_listener)
own_host=${listener%:*}
echo "VM listener $listener; host addresses: $own_host $HOST_ADDRS; ports: $HOST_PORTS"

targets=""
add() { targets="$targets $1"; }
# Cloud metadata services (AWS/GCP/Azure/OpenStack, ECS task metadata, Alibaba).
add "metadata-169.254.169.254=169.254.169.254:80/latest/meta-data/iam/security-credentials/"
add "metadata-169.254.170.2=169.254.170.2:80/v2/credentials"
add "metadata-100.100.100.200=100.100.100.200:80/latest/meta-data/"
# A private LAN.
for a in $LAN_ADDRS; do add "lan-$a=$a"; done
# Every host address (its own listener's, the others the suite names) on every port the suite
# names (the node's API, a loopback-only listener, a listener on a dummy link, one on every
# address, a Docker-style published port) and the node's VM port.
for h in $own_host $HOST_ADDRS; do
	for p in $HOST_PORTS; do add "host-$h:$p=$h:$p/metrics"; done
	[ "$h" = "$own_host" ] || add "host-$h:$VM_LISTEN_PORT=$h:$VM_LISTEN_PORT/healthz"
done
# Another VM: its guest address and its listener.
if [ -n "$OTHER_GUEST" ]; then
	for p in 22 80 2375 2376 7071; do add "other-vm-$OTHER_GUEST:$p=$OTHER_GUEST:$p"; done
fi
[ -n "$OTHER_LISTENER" ] && add "other-vm-listener=$OTHER_LISTENER/healthz"
# shellcheck disable=SC2086
$hostile probe "${PROBE_TIMEOUT_S:-6}" $targets | tee -a "$results"

# IPv6: AWS's metadata address (the guest has no IPv6 address or route; nothing outside counts
# this one, the attempt's own result is all there is).
if out=$(wget -q -T 4 -O - "http://[fd00:ec2::254]/latest/meta-data/" 2>&1); then
	record "metadata-fd00:ec2::254 REACHED answered: $(echo "$out" | head -c 80)"
else
	record "metadata-fd00:ec2::254 blocked $(echo "$out" | head -c 80 | tr '\n' ' ')"
fi

if [ -n "$OTHER_GUEST" ]; then
	if ping -c 3 -W 2 "$OTHER_GUEST" >/tmp/ping.txt 2>&1; then
		record "other-vm-ping REACHED $OTHER_GUEST answered: $(grep -m1 'bytes from' /tmp/ping.txt)"
	else
		record "other-vm-ping blocked $OTHER_GUEST: $(tail -n 2 /tmp/ping.txt | tr '\n' ' ')"
	fi
fi
# The operator's routes on the VM's own listener: only the report, logs and sources belong there.
for route in metrics healthz readyz v1/builds; do
	out=$($hostile http "listener-$route" GET "$listener" "/$route" -)
	case $out in
	*status=404) record "listener-${route%%/*} blocked ${out#* } (not served on the VM listener)" ;;
	*status=*) record "listener-${route%%/*} REACHED ${out#* } (the node answered /$route)" ;;
	*) record "listener-${route%%/*} blocked ${out#* }" ;;
	esac
done
exit 0
