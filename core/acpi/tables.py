"""ACPI system description tables (ACPI 6.x, section 5.2): the header and its
checksum, RSDP, XSDT, FADT, MADT, and a DSDT wrapper for AML."""
from __future__ import annotations

import struct
from dataclasses import dataclass

OEM_ID = b"KVMKIT"
OEM_TABLE_ID = b"KVMKIT  "
OEM_REVISION = 1
CREATOR_ID = b"KVMK"
CREATOR_REVISION = 1
HEADER_SIZE = 36

RSDP_SIZE = 36
FADT_SIZE = 276
FADT_REVISION, FADT_MINOR = 6, 3
MADT_REVISION = 5
DSDT_REVISION = 2            # 2: AML integers are 64 bits

# FADT flags (5.2.9, table 5.10)
FADT_WBINVD = 1 << 0
FADT_PWR_BUTTON = 1 << 4     # set: the power button is a control-method device, not fixed
FADT_SLP_BUTTON = 1 << 5     # set: no fixed sleep button
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (table 5.11)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_VGA_NOT_PRESENT = 1 << 2

# Generic Address Structure (5.2.3.2)
SPACE_SYSTEM_MEMORY, SPACE_SYSTEM_IO = 0, 1
ACCESS_BYTE = 1

# MADT entries (5.2.12)
MADT_PCAT_COMPAT = 1
MADT_LAPIC, MADT_IOAPIC, MADT_ISO, MADT_LAPIC_NMI = 0, 1, 2, 4
LAPIC_ENABLED = 1
ALL_PROCESSORS = 0xFF
# MPS INTI flags: polarity bits 0-1 (1 active high, 3 active low), trigger bits 2-3 (1 edge, 3 level)
INTI_CONFORMS = 0


def checksum(data: bytes) -> int:
    """Sum of all bytes mod 256; 0 for a valid table."""
    return sum(data) & 0xFF


def _fix_checksum(table: bytearray, offset: int, end: int | None = None) -> bytes:
    table[offset] = 0
    table[offset] = (-sum(table[:end])) & 0xFF
    return bytes(table)


def table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A table with its 36-byte header (5.2.6), checksummed."""
    if len(signature) != 4:
        raise ValueError(f"table signature must be 4 bytes, got {signature!r}")
    length = HEADER_SIZE + len(body)
    header = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                         OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    return _fix_checksum(bytearray(header + body), 9)


def rsdp(xsdt_addr: int) -> bytes:
    """Root System Description Pointer, revision 2 (5.2.5.3): XSDT only, no RSDT."""
    data = bytearray(struct.pack("<8sB6sBIIQB3x", b"RSD PTR ", 0, OEM_ID, 2, 0, RSDP_SIZE, xsdt_addr, 0))
    _fix_checksum(data, 8, 20)           # the ACPI 1.0 part
    return _fix_checksum(data, 32)       # the whole structure


def xsdt(addresses) -> bytes:
    return table(b"XSDT", 1, b"".join(struct.pack("<Q", a) for a in addresses))


def gas(space: int, address: int, bit_width: int = 8, access: int = ACCESS_BYTE) -> bytes:
    """Generic Address Structure: space id, register width, bit offset 0, access size, address."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access, address)


NO_GAS = bytes(12)


@dataclass(frozen=True)
class PowerRegisters:
    """Where the platform's I/O-space power registers are (see platform.py)."""
    sleep_control: int
    sleep_status: int
    reset: int
    reset_value: int


def fadt(dsdt_addr: int, regs: PowerRegisters) -> bytes:
    """Fixed ACPI Description Table, revision 6, hardware-reduced (5.2.9).

    Hardware-reduced: no PM1 blocks, no SCI, no GPEs; power-off through the
    sleep control/status registers, reset through the reset register."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    put(40, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)          # DSDT
    put(109, "<H", BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT)      # IAPC_BOOT_ARCH
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
        | FADT_HW_REDUCED_ACPI)
    body[116 - HEADER_SIZE:128 - HEADER_SIZE] = gas(SPACE_SYSTEM_IO, regs.reset)   # RESET_REG
    put(128, "<B", regs.reset_value)                                 # RESET_VALUE
    put(131, "<B", FADT_MINOR)
    put(140, "<Q", dsdt_addr)                                        # X_DSDT
    body[244 - HEADER_SIZE:256 - HEADER_SIZE] = gas(SPACE_SYSTEM_IO, regs.sleep_control)
    body[256 - HEADER_SIZE:268 - HEADER_SIZE] = gas(SPACE_SYSTEM_IO, regs.sleep_status)
    put(268, "<8s", b"KVMKIT\0\0")                                   # hypervisor vendor identity
    return table(b"FACP", FADT_REVISION, bytes(body))


@dataclass(frozen=True)
class Override:
    """An interrupt source override: ISA ``irq`` arrives at ``gsi`` with these MPS INTI flags."""
    irq: int
    gsi: int
    flags: int = INTI_CONFORMS


def madt(vcpus: int, lapic_addr: int, ioapic_id: int, ioapic_addr: int,
         overrides=(), nmi_lint: int = 1) -> bytes:
    """Multiple APIC Description Table (5.2.12): a local APIC per vCPU (APIC id =
    vCPU index), one IOAPIC at GSI base 0, interrupt source overrides, and
    the local APICs' NMI input."""
    if not 1 <= vcpus <= 255:
        raise ValueError(f"the MADT's local APIC entries take 1-255 vCPUs, got {vcpus}")
    body = struct.pack("<II", lapic_addr, MADT_PCAT_COMPAT)
    body += b"".join(struct.pack("<BBBBI", MADT_LAPIC, 8, i, i, LAPIC_ENABLED) for i in range(vcpus))
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id, 0, ioapic_addr, 0)
    body += b"".join(struct.pack("<BBBBIH", MADT_ISO, 10, 0, o.irq, o.gsi, o.flags) for o in overrides)
    body += struct.pack("<BBBHB", MADT_LAPIC_NMI, 6, ALL_PROCESSORS, INTI_CONFORMS, nmi_lint)
    return table(b"APIC", MADT_REVISION, body)


def dsdt(aml_body: bytes) -> bytes:
    """Differentiated System Description Table: the AML definition block."""
    return table(b"DSDT", DSDT_REVISION, aml_body)
