"""ACPI under KVM: the kit's "acpi" kernel (configured like Debian's for SMP
discovery: ACPI on, no MP-table parsing) finds both CPUs, the IOAPIC, and the
serial port, the clock and the keyboard controller through the DSDT; its ACPI
reset (``reboot=acpi``, through the FADT reset register: the chipset's 0xCF9)
ends kvmkit with status 0; the power button reaches the guest.  And ``acpi = false`` leaves no RSDP in guest memory.

The guest's own ``poweroff`` (ACPI S5) is tested from its userspace in
test_userspace.py; here ``kvmkit stop`` presses the power button and the
guest's busybox acpid powers it off.
"""
import os
import struct
import subprocess
import sys
import threading

import pytest

from guest import initrd_with_hooks, machine_file, run_kvmkit

pytestmark = pytest.mark.kvm

def acpi_machine(d, name, vmlinux, initrd=None, acpi=None, vcpus=2):
    return machine_file(d / f"{name}.toml", name=name, image=vmlinux, initrd=initrd, vcpus=vcpus,
                        acpi=acpi, cmdline="console=ttyS0 reboot=acpi panic=-1")


@pytest.fixture(scope="module")
def reset_boot(guest_kit, tmp_path_factory):
    """No initramfs: the kernel panics when it cannot mount a root, and
    ``panic=-1 reboot=acpi`` resets through the FADT reset register."""
    d = tmp_path_factory.mktemp("acpi")
    result = run_kvmkit(["-v", "run", str(acpi_machine(d, "acpi-reset", guest_kit["ACPI_VMLINUX"]))],
                        timeout=900)
    print(result.describe())
    return result


@pytest.mark.parametrize("table", ["RSDP", "XSDT", "FACP", "DSDT", "APIC"])
def test_guest_finds_the_tables(reset_boot, table):
    assert reset_boot.find(rf"ACPI: {table} 0x0*F[0-9A-F]{{4}} .*KVMKIT"), reset_boot.describe()


def test_both_cpus_come_up_through_the_madt(reset_boot):
    assert reset_boot.find(r"smp: Brought up 1 node, 2 CPUs"), reset_boot.describe()
    assert not reset_boot.find(r"MPTABLE|Intel MultiProcessor Specification"), reset_boot.describe()


def test_ioapic_from_the_madt(reset_boot):
    assert reset_boot.find(r"IOAPIC\[0\]: apic_id 2, version \d+, address 0xfec00000, GSI 0-23"), \
        reset_boot.describe()


def test_serial_port_bound_through_acpi_pnp(reset_boot):
    assert reset_boot.find(r"00:0\d: ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A"), \
        reset_boot.describe()


def test_rtc_bound_through_acpi_pnp(reset_boot):
    assert reset_boot.find(r"rtc_cmos 00:0\d: registered as rtc0"), reset_boot.describe()


def test_pci_host_bridge_from_the_dsdt(reset_boot):
    assert reset_boot.find(r"PCI Root Bridge \[PCI0\] \(domain 0000 \[bus 00\]\)"), reset_boot.describe()


def test_acpi_reset_ends_kvmkit_with_0(reset_boot):
    assert reset_boot.returncode == 0, reset_boot.describe()
    assert "guest reset (port 0xCF9" in reset_boot.stderr, reset_boot.describe()   # the FADT RESET_REG
    assert "the guest runs ACPI" in reset_boot.stderr, reset_boot.describe()


WAIT_FOR_BUTTON = ('#!/bin/sh\necho "kvmkit-guest: waiting for the power button"\n'
                   'touch /tmp/kvmkit-no-reset\nwhile :; do sleep 5; done\n')


def test_power_button_powers_the_guest_off(guest_kit, tmp_path_factory):
    """A graceful stop presses the ACPI power button (the GED's interrupt);
    the guest's _EVT notifies PWRB, the kernel's button driver reports a key,
    busybox acpid in the guest runs ``poweroff``, and the guest's S5 ends
    kvmkit with status 0."""
    d = tmp_path_factory.mktemp("acpi-button")
    xdg = d / "xdg"
    xdg.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(xdg)}
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"wait": WAIT_FOR_BUTTON})
    # One vCPU: both CPUs through the MADT are checked on reset_boot, and a
    # second vCPU only slows a guest on a loaded 2-core host.
    machine = acpi_machine(d, "acpi-button", guest_kit["ACPI_VMLINUX"], initrd, vcpus=1)
    stops, stopped = [], threading.Event()

    def stop(_proc):
        try:
            stops.append(subprocess.run([sys.executable, "-m", "kvmkit", "stop", "acpi-button",
                                         "--timeout", "120"], env=env, capture_output=True,
                                        text=True, timeout=300))
        finally:
            stopped.set()

    # run_kvmkit reads the console on its own thread and ends kvmkit after the
    # timeout: a guest that never prints the line fails instead of hanging.
    boot = run_kvmkit(["-v", "run", str(machine)], timeout=1200, env=env,
                      when=r"waiting for the power button", then=stop)
    assert boot.find(r"waiting for the power button"), boot.describe()
    assert stopped.wait(60), "kvmkit stop did not return after the VM ended"
    assert stops, "kvmkit stop failed to run"
    done, err, text = stops[0], boot.stderr, boot.console
    assert "pressing the ACPI power button" in err, boot.describe() + done.stdout + done.stderr
    assert "the guest took the power-button event" in err, boot.describe()
    assert "The system is going down NOW!" in text or "Sent SIGTERM to all processes" in text, boot.describe()
    assert done.returncode == 0 and "(exit status 0)" in done.stdout, done.stdout + done.stderr
    assert boot.returncode == 0 and "guest power-off" in err, boot.describe()


# -- acpi = false ------------------------------------------------------------------------
def _build(path):
    from kvmkit.config import load_machine
    from kvmkit.machine import Machine
    m = Machine(load_machine(path))
    m.build()
    return m


def test_acpi_false_writes_no_rsdp(guest_kit, tmp_path):
    rsdp_ptr = 0x7000 + 0x70                     # boot_params.acpi_rsdp_addr
    on = _build(acpi_machine(tmp_path, "acpi-on", guest_kit["SMALL_VMLINUX"]))
    try:
        rsdp = struct.unpack("<Q", on.memory.read(rsdp_ptr, 8))[0]
        assert on.memory.read(rsdp, 8) == b"RSD PTR " and 0xE0000 <= rsdp < 0x100000
    finally:
        on.close()
    off = _build(acpi_machine(tmp_path, "acpi-off", guest_kit["SMALL_VMLINUX"], acpi=False))
    try:
        assert struct.unpack("<Q", off.memory.read(rsdp_ptr, 8))[0] == 0
        assert b"RSD PTR " not in off.memory.read(0xE0000, 0x20000)
        assert off.acpi is None
    finally:
        off.close()
