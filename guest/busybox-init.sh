#!/bin/busybox sh
# kvmkit busybox guest /init (installed as /init in initramfs/busybox.cpio).
#
# Mounts the kernel's file systems, then hands PID 1 to busybox init with an
# inittab for one of three modes, chosen on the kernel command line:
#
#   kvmkit.init=tests   (the default) print "kvmkit-guest: ..." lines for the
#                       host-side tests, run the /etc/kvmkit-tests/*.sh hooks,
#                       then reset (reboot -f).  Hooks are added without
#                       rebuilding: append a second newc archive holding
#                       etc/kvmkit-tests/NAME.sh (the kernel unpacks
#                       concatenated archives in order).
#   kvmkit.init=report  print what the guest sees (CPUs, memory, devices,
#                       clock), then power off.  `./demo </dev/null`.
#   kvmkit.init=shell   a shell on the console's tty, its controlling
#                       terminal (job control: Ctrl-C, Ctrl-Z); leaving it
#                       powers off.  `./demo` on a tty.
#
# In every mode busybox init is PID 1, so `poweroff`, `reboot` and `halt` end
# the guest cleanly, Ctrl-Alt-Del (kvmkit stop without ACPI) reboots, and
# busybox acpid turns the ACPI power button (kvmkit stop with ACPI) into a
# power-off.
#
# Guest userspace runs on the project's nested paravirtual CI host only with
# the kit's kernel patch (guest/pvm-user-syscall.patch); every system call's
# kernel side is emulated there (milliseconds each), so keep scripts short.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Each program started costs a fork and an exec, a second or more on the
# nested CI host, where every guest kernel instruction is emulated: so one
# mount for proc, sysfs and devtmpfs (/etc/fstab), and shell built-ins below.
/bin/busybox mount -a 2>/dev/null

mode=tests
read -r cmdline < /proc/cmdline
for word in $cmdline; do
	case $word in
	kvmkit.init=*) mode=${word#kvmkit.init=} ;;
	esac
done

case $mode in
tests)	main="::once:/etc/kvmkit/tests.sh" ;;
report)	main="::once:/etc/kvmkit/report.sh" ;;
shell)	# The shell gets the console's own tty (e.g. ttyS0) from busybox init,
	# which opens it as the controlling terminal: /dev/console never is
	# one, and without it the shell has no job control (Ctrl-C, Ctrl-Z).
	tty=
	read -r consoles < /sys/class/tty/console/active
	for tty in $consoles; do :; done	# the last one is /dev/console
	main="$tty::once:/etc/kvmkit/shell.sh"
	# ptys and POSIX shared memory, for what a user may run in the shell
	/bin/busybox mkdir -p /dev/pts /dev/shm
	/bin/busybox mount -t devpts devpts /dev/pts 2>/dev/null ;;
*)	echo "kvmkit-guest: unknown kvmkit.init=$mode (tests, report or shell); using tests"
	main="::once:/etc/kvmkit/tests.sh" ;;
esac

printf '%s\n' "::sysinit:/etc/kvmkit/start.sh" "$main" "::ctrlaltdel:/sbin/reboot" \
	"::shutdown:/bin/sync" "::shutdown:/bin/umount -a -r" > /etc/inittab
exec /bin/busybox init
