#!/bin/sh
# kvmkit.init=report: what the guest sees, in its own words, then power off.
echo
echo "=== kvmkit demo guest: what this Linux sees ==="
echo "kernel:   $(uname -sr) ($(uname -m))"
echo "cpus:     $(grep -c '^processor' /proc/cpuinfo) online: $(cat /sys/devices/system/cpu/online)"
echo "memory:   $(awk '/^MemTotal/ {printf "%d MiB total", $2/1024} /^MemAvailable/ {printf ", %d MiB available", $2/1024}' /proc/meminfo)"
echo "clock:    $(date -u '+%Y-%m-%d %H:%M:%S UTC') (from the CMOS RTC: $(hwclock -r -u 2>/dev/null || echo unreadable))"
echo "uptime:   $(cut -d' ' -f1 /proc/uptime) s"
echo "consoles: $(cat /sys/class/tty/console/active)"
for d in /sys/bus/pci/devices/*; do
	[ -e "$d" ] || continue
	drv=-
	[ -e "$d/driver" ] && drv=$(basename "$(readlink "$d/driver")")
	echo "pci:      $(basename "$d") $(cat "$d/vendor"):$(cat "$d/device") class $(cat "$d/class") driver $drv"
done
for b in /sys/block/*; do
	[ -e "$b" ] || continue
	echo "disk:     $(basename "$b") $(( $(cat "$b/size") / 2048 )) MiB"
done
for n in /sys/class/net/*; do
	[ -e "$n" ] || continue
	echo "network:  $(basename "$n") $(cat "$n/address")"
done
for r in /sys/class/rtc/*; do
	[ -e "$r" ] || continue
	echo "rtc:      $(basename "$r") $(cat "$r/name")"
done
echo "=== end of report; powering off ==="
poweroff
