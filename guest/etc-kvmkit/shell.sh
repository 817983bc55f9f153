#!/bin/sh
# kvmkit.init=shell: a shell on the console; leaving it powers the guest off.
echo
echo "kvmkit demo guest: a busybox shell. Leave with 'poweroff' or 'reboot'"
echo "(or exit the shell); Ctrl-A x quits kvmkit at once."
cd /root
HOME=/root cttyhack sh -l
poweroff
