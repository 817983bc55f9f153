#!/bin/sh
# kvmkit.init=tests: what the host-side tests read, then the hooks, then reset.
echo "kvmkit-guest: userspace up"
echo "kvmkit-guest: cpus=$(grep -c '^processor' /proc/cpuinfo)"
echo "kvmkit-guest: date=$(date +%s)"
read -r release < /proc/sys/kernel/osrelease
echo "kvmkit-guest: uname=$release"
for hook in /etc/kvmkit-tests/*.sh; do
	[ -f "$hook" ] || continue
	echo "kvmkit-guest: hook $hook"
	sh "$hook"
	echo "kvmkit-guest: hook $hook rc=$?"
done
echo "kvmkit-guest: done"
sync
# A hook may end the guest its own way (poweroff, halt, ...) and set this.
[ -e /tmp/kvmkit-no-reset ] && exit 0
reboot -f
echo "kvmkit-guest: reboot failed"
