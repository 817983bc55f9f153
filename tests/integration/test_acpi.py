"""ACPI under KVM: the kit's "acpi" kernel (configured like Debian's for SMP
discovery: ACPI on, no MP-table parsing) finds both CPUs, the IOAPIC, and the
serial port, the clock and the keyboard controller through the DSDT; its ACPI
reset (``reboot=acpi``, through the FADT reset register: the chipset's 0xCF9)
ends kvmkit with status 0.  And ``acpi = false`` leaves no RSDP in guest memory.

The power button (``kvmkit stop``), which the guest's busybox acpid turns
into a ``poweroff`` and ACPI S5, is tested at the end of test_userspace.py's
guest.
"""
import struct

import pytest

from guest import machine_file, run_kvmkit

pytestmark = pytest.mark.kvm

def acpi_machine(d, name, vmlinux, initrd=None, acpi=None):
    return machine_file(d / f"{name}.toml", name=name, image=vmlinux, initrd=initrd, vcpus=2,
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
