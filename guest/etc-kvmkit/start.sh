#!/bin/sh
# busybox init's sysinit step (see guest/busybox-init.sh): host name, loopback,
# and busybox acpid when the kernel has an ACPI power button, so that the
# button (kvmkit stop on an ACPI guest) powers the guest off.  Shell
# built-ins where they do (each program started is a second or more on the
# nested CI host).
echo kvmkit-guest > /proc/sys/kernel/hostname
ip link set lo up 2>/dev/null
for ev in /dev/input/event*; do
	[ -e "$ev" ] || continue
	# acpid logs to /var/log/acpid.log (in the initramfs) and exits at once
	# if it cannot open it
	acpid
	break
done
exit 0
