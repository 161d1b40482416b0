#!/bin/sh
# The config drive (secrets.json), the scratch disk and the root image: block devices of the VM
# that a RUN step must not read, by name or by a device node it makes itself; and secrets on
# the kernel command line.
# shellcheck source=examples/hostile/attacks/lib.sh
. /hostile/attacks/lib.sh
echo "partitions:"; cat /proc/partitions
nodes=$(ls /dev/vd* 2>/dev/null | tr '\n' ' ')
if [ -n "$nodes" ]; then record "dev-nodes REACHED /dev has $nodes"; else record "dev-nodes blocked no /dev/vd* in the container"; fi
for d in vda vdb vdc vdd; do
	n=$(head -c 4096 "/dev/$d" 2>/tmp/cat.err | wc -c)
	if [ "$n" -gt 0 ]; then
		record "dev-cat-$d REACHED read $n bytes of /dev/$d"
	else
		record "dev-cat-$d blocked cat /dev/$d: $(head -c 100 /tmp/cat.err | tr '\n' ' ')"
	fi
done
# Device nodes made with mknod from /proc/partitions' numbers, read and mounted.
mkdir -p /tmp/dev /tmp/mnt
found=0
while read -r major minor _blocks name; do
	case $name in vd*) ;; *) continue ;; esac
	found=1
	node=/tmp/dev/$name
	if ! err=$(mknod "$node" b "$major" "$minor" 2>&1); then
		record "dev-read-$name blocked mknod $major:$minor: $err"
		record "dev-mount-$name blocked no node to mount (mknod refused)"
		continue
	fi
	if n=$(dd if="$node" bs=4096 count=1 2>/tmp/dd.err | wc -c) && [ "$n" -gt 0 ]; then
		record "dev-read-$name REACHED read $n bytes through a node $major:$minor"
	else
		record "dev-read-$name blocked read through a node $major:$minor: $(tr '\n' ' ' </tmp/dd.err)"
	fi
	mkdir -p "/tmp/mnt/$name"
	if err=$(mount -o ro "$node" "/tmp/mnt/$name" 2>&1); then
		record "dev-mount-$name REACHED mounted: $(ls "/tmp/mnt/$name" | tr '\n' ' ')"
		umount "/tmp/mnt/$name"
	else
		record "dev-mount-$name blocked mount: $err"
	fi
done </proc/partitions
[ "$found" = 1 ] || record "dev-read-partitions blocked /proc/partitions lists no vd* device"
echo "mounts:"; mount
# Docker binds /etc/hosts, /etc/resolv.conf and /etc/hostname from files on a VM disk: those
# three are expected, any other mount of a VM disk or of the config drive is not.
other=$(mount | grep -v ' on /etc/\(hosts\|resolv.conf\|hostname\) ' | grep 'builder-config\|/dev/vd')
if [ -n "$other" ]; then
	record "mount-table REACHED the container sees $(echo "$other" | head -n 3 | tr '\n' ';')"
else
	record "mount-table blocked no VM disk or config drive mounted in the container (beyond Docker's /etc files)"
fi
if grep -qi 'secret\|access_key\|token\|password' /proc/cmdline; then
	record "cmdline-secrets REACHED /proc/cmdline: $(grep -oi '[a-z_]*\(secret\|access_key\|token\|password\)[a-z_]*=[^ ]*' /proc/cmdline | head -n 3 | tr '\n' ' ')"
else
	record "cmdline-secrets blocked no secret, key, token or password on /proc/cmdline"
fi
exit 0
