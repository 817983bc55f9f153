#!/bin/sh
# kvmkit.init=report: what the guest sees, in its own words, then power off.
# Short files are read with shell built-ins: each program started costs a
# second or more on the nested CI host (every guest kernel instruction is
# emulated there), but the shell's read takes a system call per byte, so
# long files still go to a program.
field() {	# field FILE KEY: value= the first word after "KEY=" or "KEY:" in FILE
	value=
	while IFS='=:' read -r k v; do
		[ "$k" = "$2" ] && { set -- $v; value=$1; return; }
	done < "$1"
}
read -r ostype < /proc/sys/kernel/ostype
read -r release < /proc/sys/kernel/osrelease
cpus=$(grep -c '^processor' /proc/cpuinfo)
read -r online < /sys/devices/system/cpu/online
field /proc/meminfo MemTotal; total=$value
field /proc/meminfo MemAvailable; avail=$value
read -r uptime rest < /proc/uptime
read -r consoles < /sys/class/tty/console/active

echo
echo "=== kvmkit demo guest: what this Linux sees ==="
echo "kernel:   $ostype $release ($(uname -m))"
echo "cpus:     $cpus online: $online"
echo "memory:   $((total / 1024)) MiB total, $((avail / 1024)) MiB available"
echo "clock:    $(date -u '+%Y-%m-%d %H:%M:%S UTC') (from the CMOS RTC: $(hwclock -r -u 2>/dev/null || echo unreadable))"
echo "uptime:   $uptime s"
echo "consoles: $consoles"
for d in /sys/bus/pci/devices/*; do
	[ -e "$d" ] || continue
	read -r vendor < "$d/vendor"
	read -r device < "$d/device"
	read -r class < "$d/class"
	field "$d/uevent" DRIVER
	echo "pci:      ${d##*/} $vendor:$device class $class driver ${value:--}"
done
for b in /sys/block/*; do
	[ -e "$b" ] || continue
	read -r sectors < "$b/size"
	echo "disk:     ${b##*/} $((sectors / 2048)) MiB"
done
for n in /sys/class/net/*; do
	[ -e "$n" ] || continue
	read -r address < "$n/address"
	echo "network:  ${n##*/} $address"
done
for r in /sys/class/rtc/*; do
	[ -e "$r" ] || continue
	read -r name < "$r/name"
	echo "rtc:      ${r##*/} $name"
done
echo "=== end of report; powering off ==="
poweroff
