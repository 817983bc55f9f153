"""ACPI system description tables (ACPI 6.x, section 5.2): the header and its
checksum, RSDP, XSDT, FADT, FACS, MADT, and a DSDT wrapper for AML."""
from __future__ import annotations

import struct
from typing import NamedTuple

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
FADT_TMR_VAL_EXT = 1 << 8    # the PM timer counts 32 bits
FADT_RESET_REG_SUP = 1 << 10
FADT_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (table 5.11)
BOOT_LEGACY_DEVICES = 1 << 0
BOOT_VGA_NOT_PRESENT = 1 << 2

# Generic Address Structure (5.2.3.2)
SPACE_SYSTEM_MEMORY, SPACE_SYSTEM_IO = 0, 1
ACCESS_BYTE, ACCESS_WORD, ACCESS_DWORD = 1, 2, 3
# Interrupt source override flags (MPS INTI): active high (1), level-triggered (3 << 2)
INTI_LEVEL_HIGH = 0x000D

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


class PowerRegisters(NamedTuple):
    """Where the platform's fixed ACPI registers are, all in I/O space (see platform.py)."""
    pm1a_event: int              # PM1_STS (2 bytes) then PM1_EN (2 bytes)
    pm1a_control: int            # PM1_CNT (2 bytes)
    pm_timer: int                # PM_TMR (4 bytes, 32-bit counter at 3.579545 MHz)
    reset: int
    reset_value: int
    sci_irq: int


FACS_SIZE = 64


def facs() -> bytes:
    """Firmware ACPI Control Structure (5.2.10), version 2: no waking vector,
    no global lock owner.  It has no checksum."""
    return struct.pack("<4sIIIIIQB3xI24x", b"FACS", FACS_SIZE, 0, 0, 0, 0, 0, 2, 0)


def fadt(dsdt_addr: int, facs_addr: int, regs: PowerRegisters) -> bytes:
    """Fixed ACPI Description Table, revision 6 (5.2.9).

    Not hardware-reduced: Linux keeps the PIT and the PICs that KVM provides
    (hardware-reduced x86 Linux drops both).  PM1a event/control blocks and a
    32-bit PM timer in I/O space, the SCI on ``sci_irq``, no SMI command port
    (the machine is always in ACPI mode), no GPE blocks; reset through the
    reset register.  The power button is a control-method device (the DSDT's
    GED), not the fixed one."""
    body = bytearray(FADT_SIZE - HEADER_SIZE)

    def put(offset: int, fmt: str, *values) -> None:
        struct.pack_into(fmt, body, offset - HEADER_SIZE, *values)

    def put_gas(offset: int, data: bytes) -> None:
        body[offset - HEADER_SIZE:offset - HEADER_SIZE + 12] = data

    put(36, "<I", facs_addr)                                         # FIRMWARE_CTRL
    put(40, "<I", dsdt_addr)                                         # DSDT
    put(46, "<H", regs.sci_irq)                                      # SCI_INT
    put(56, "<I", regs.pm1a_event)                                   # PM1a_EVT_BLK
    put(64, "<I", regs.pm1a_control)                                 # PM1a_CNT_BLK
    put(76, "<I", regs.pm_timer)                                     # PM_TMR_BLK
    put(88, "<BBBB", 4, 2, 0, 4)                                     # PM1_EVT_LEN, PM1_CNT_LEN, PM2, PM_TMR_LEN
    put(96, "<HH", 101, 1001)                                        # P_LVL2/3_LAT: C2/C3 not supported
    put(109, "<H", BOOT_LEGACY_DEVICES | BOOT_VGA_NOT_PRESENT)      # IAPC_BOOT_ARCH
    put(112, "<I", FADT_WBINVD | FADT_PWR_BUTTON | FADT_SLP_BUTTON | FADT_RESET_REG_SUP
        | FADT_TMR_VAL_EXT)
    put_gas(116, gas(SPACE_SYSTEM_IO, regs.reset))                   # RESET_REG
    put(128, "<B", regs.reset_value)                                 # RESET_VALUE
    put(131, "<B", FADT_MINOR)
    put(132, "<Q", facs_addr)                                        # X_FIRMWARE_CTRL
    put(140, "<Q", dsdt_addr)                                        # X_DSDT
    put_gas(148, gas(SPACE_SYSTEM_IO, regs.pm1a_event, 32, ACCESS_WORD))
    put_gas(172, gas(SPACE_SYSTEM_IO, regs.pm1a_control, 16, ACCESS_WORD))
    put_gas(208, gas(SPACE_SYSTEM_IO, regs.pm_timer, 32, ACCESS_DWORD))
    put(268, "<8s", b"KVMKIT\0\0")                                  # hypervisor vendor identity
    return table(b"FACP", FADT_REVISION, bytes(body))


class Override(NamedTuple):
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
