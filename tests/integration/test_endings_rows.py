"""Every way a Linux guest ends, one row each (issue 18's table in the
README), on restored snapshots: one guest per machine is booted to a prompt
of its own /init and snapshotted there; each row restores that snapshot and
types the row's ending to the prompt.  The ending is chosen at run time,
where Linux allows it: the restart method through /sys/kernel/reboot/type
(what `reboot=` sets at boot: kbd, triple, acpi, pci, bios; "default" leaves
the boot's choice, no `reboot=`: Linux's own order), `panic=` through
/proc/sys/kernel/panic, and a panic by PID 1 exiting ("Attempted to kill
init!").  Each row asserts what kvmkit ended with: its status and the
reason it printed.  The machines: the kit's ACPI kernel with an i8042 and a
pvpanic device, the same without either, and the small kernel (no ACPI).
A triple fault and a jump to unbacked memory from hand-made guests are in
test_guest_endings.py."""
from __future__ import annotations

import subprocess
import time

import pytest

from guest import KVMKIT, machine_file, newc, run_kvmkit

pytestmark = pytest.mark.kvm
pytest.importorskip("kvmkit.device_state", reason="snapshots (kvmkit.device_state) are not in this tree")

# The guest's own /init (it replaces the kit's in the initramfs): it reads
# one row from the console and ends that way.  Each command runs in a child,
# so that PID 1 outlives it unless the row is PID 1's own exit.
INIT = """#!/bin/busybox sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "kvmkit-endings: ready"
read -r row
echo "kvmkit-endings: row $row"
case $row in
reboot:default) reboot -f ;;
reboot:*) echo "${row#reboot:}" > /sys/kernel/reboot/type && reboot -f ;;
poweroff) poweroff -f ;;
halt) halt -f ;;
panic:*) echo "${row#panic:}" > /proc/sys/kernel/panic && exit 1 ;;
esac
echo "kvmkit-endings: still here after $row"
while :; do sleep 60; done
"""
# lapic=notscdeadline: a restored guest's clock has moved on; its periodic
# tick must not replay every missed tick in the nested host's emulator
# (README, Snapshots).
CMDLINE = "console=ttyS0 lapic=notscdeadline"
STALL = 20          # [machine] stall_timeout for the rows only the watchdog ends

MACHINES = {
    "acpi+i8042+pvpanic": ("ACPI_VMLINUX", ({"kind": "serial8250"}, {"kind": "rtc"},
                                            {"kind": "i8042"}, {"kind": "pvpanic"})),
    "acpi": ("ACPI_VMLINUX", ({"kind": "serial8250"}, {"kind": "rtc"})),
    "no-acpi": ("SMALL_VMLINUX", ({"kind": "serial8250"}, {"kind": "rtc"}, {"kind": "i8042"})),
}

CF9 = "guest reset (port 0xCF9"
# row: (machine, what is typed, kvmkit's status, the start of its reason)
ROWS = {
    "reboot=k, i8042": ("acpi+i8042+pvpanic", "reboot:kbd", 0, "guest reset (i8042)"),
    "reboot=t, i8042": ("acpi+i8042+pvpanic", "reboot:triple", 0, "guest reset (triple fault)"),
    "reboot=a, i8042": ("acpi+i8042+pvpanic", "reboot:acpi", 0, CF9),
    "reboot=p, i8042": ("acpi+i8042+pvpanic", "reboot:pci", 0, CF9),
    "reboot=b, i8042": ("acpi+i8042+pvpanic", "reboot:bios", 0, CF9),
    "default order, i8042": ("acpi+i8042+pvpanic", "reboot:default", 0, CF9),
    "reboot=k, no i8042": ("acpi", "reboot:kbd", 0, CF9),
    "reboot=t, no i8042": ("acpi", "reboot:triple", 0, "guest reset (triple fault)"),
    "reboot=a, no i8042": ("acpi", "reboot:acpi", 0, CF9),
    "reboot=p, no i8042": ("acpi", "reboot:pci", 0, CF9),
    "reboot=b, no i8042": ("acpi", "reboot:bios", 0, CF9),
    "default order, no i8042": ("acpi", "reboot:default", 0, CF9),
    "poweroff, ACPI": ("acpi", "poweroff", 0, "guest power-off"),
    "poweroff, no ACPI": ("no-acpi", "poweroff", 5, "guest halted"),
    "halt -f, ACPI": ("acpi", "halt", 5, "guest halted"),
    "halt -f, no ACPI": ("no-acpi", "halt", 5, "guest halted"),
    "panic=0, pvpanic": ("acpi+i8042+pvpanic", "panic:0", 4, "guest kernel panicked (pvpanic)"),
    "panic=-1, pvpanic": ("acpi+i8042+pvpanic", "panic:-1", 4, "guest kernel panicked (pvpanic)"),
    "panic=0, no pvpanic": ("acpi", "panic:0", 6, f"stalled: no vCPU exited for {STALL} s"),
    "panic=-1, no pvpanic": ("acpi", "panic:-1", 0, CF9),
}


@pytest.fixture(scope="module")
def snapshots(guest_kit, tmp_path_factory):
    """Each machine booted once and snapshotted at its /init's prompt."""
    d = tmp_path_factory.mktemp("endings")
    initrd = d / "initrd.cpio"
    initrd.write_bytes(guest_kit["BUSYBOX_CPIO"].read_bytes() + newc({"init": INIT.encode()}))
    return _Snapshots(d, initrd, guest_kit)


class _Snapshots:
    def __init__(self, d, initrd, kit):
        self.d, self.initrd, self.kit = d, initrd, kit
        self.taken: dict[str, object] = {}

    def get(self, machine: str):
        if machine not in self.taken:
            self.taken[machine] = self._take(machine)
        return self.taken[machine]

    def _take(self, machine: str):
        kernel, devices = MACHINES[machine]
        name = f"endings-{machine.replace('+', '-')}-{int(time.time())}"
        m = machine_file(self.d / f"{name}.toml", name=name, image=self.kit[kernel],
                         initrd=self.initrd, cmdline=CMDLINE, devices=devices)
        snap = self.d / name
        took = {}

        def take(_proc):
            took["snapshot"] = subprocess.run(KVMKIT + ["snapshot", name, str(snap)],
                                              capture_output=True, text=True, timeout=120)
            took["kill"] = subprocess.run(KVMKIT + ["kill", name], capture_output=True, text=True,
                                          timeout=60)

        boot = run_kvmkit(["run", str(m)], timeout=900, when=r"kvmkit-endings: ready", then=take,
                          stdin=subprocess.PIPE)
        print(f"{machine}: booted and snapshotted in {boot.wall:.0f} s")
        assert "snapshot" in took, boot.describe()
        assert took["snapshot"].returncode == 0, (took["snapshot"].stderr, boot.describe())
        return snap


@pytest.mark.parametrize("row", ROWS)
def test_the_guest_ending_ends_kvmkit_with_its_status(row, snapshots, tmp_path):
    machine, typed, status, reason = ROWS[row]
    snap = snapshots.get(machine)
    # The row is on kvmkit's stdin from the start: the console's stdio
    # backend passes it to the restored guest, which sits in its read.
    (tmp_path / "typed").write_text(f"{typed}\n")
    flags = ["--stall-timeout", str(STALL)] if status == 6 else []
    with open(tmp_path / "typed", "rb") as stdin:
        result = run_kvmkit(["run", "--restore", str(snap), "--name", "row", *flags],
                            timeout=600, stdin=stdin)
    print(f"{row}: status {result.returncode} in {result.wall:.1f} s from the restore\n"
          f"{result.describe()}")
    assert result.find(rf"kvmkit-endings: row {typed}"), result.describe()   # the guest read it
    assert result.returncode == status, result.describe()
    summary = [line for line in result.stderr.splitlines() if line.startswith("kvmkit: row: ")]
    assert summary and summary[-1].startswith(f"kvmkit: row: {reason}"), result.describe()
