#!/bin/busybox sh
# kvmkit busybox guest /init (installed as /init in initramfs/busybox.cpio).
#
# Prints "kvmkit-guest: ..." lines on the console for the host-side tests,
# runs any /etc/kvmkit-tests/*.sh hooks, then resets the VM.  Hooks can be
# added without rebuilding: append a second newc archive holding
# etc/kvmkit-tests/NAME.sh to the image (the kernel unpacks concatenated
# archives in order).
#
# On a host whose guest userspace cannot make system calls (the project's CI
# host, see shared/HOST-NOTES.md) this script dies at its first system call
# and the kernel panics with "Attempted to kill init"; with panic=-1 on the
# command line the guest then resets.  That is expected there.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev 2>/dev/null

echo "kvmkit-guest: userspace up"
echo "kvmkit-guest: cpus=$(grep -c '^processor' /proc/cpuinfo)"
echo "kvmkit-guest: date=$(date +%s)"
echo "kvmkit-guest: uname=$(uname -r)"

for hook in /etc/kvmkit-tests/*.sh; do
	[ -f "$hook" ] || continue
	echo "kvmkit-guest: hook $hook"
	sh "$hook"
	echo "kvmkit-guest: hook $hook rc=$?"
done

echo "kvmkit-guest: done"
sync
reboot -f
# Only reached if the reset did not happen: exiting PID 1 panics the kernel,
# and panic=-1 resets the VM.
echo "kvmkit-guest: reboot failed"
exit 1
