"""Lay the ACPI tables out in guest memory: the RSDP first, then XSDT, FADT,
MADT and DSDT, each 16-byte aligned, all inside one reserved area (the BIOS
area 0xF0000-0xFFFFF, which e820 reserves and Linux scans for the RSDP)."""
from __future__ import annotations

from typing import NamedTuple

from . import dsdt, tables
from .tables import Override, PowerRegisters

ALIGN = 16
# KVM's default routing sends GSI n to IOAPIC pin n and the MP table maps ISA
# IRQ n to pin n; say the same for the timer, which some OSes otherwise
# assume on pin 2.
TIMER_OVERRIDE = Override(irq=0, gsi=0)


class AcpiLayoutError(Exception):
    """The tables do not fit where they must go."""


class AcpiTables(NamedTuple):
    base: int
    blob: bytes                       # written at base
    rsdp_addr: int
    addresses: dict[bytes, int]       # signature -> guest-physical address

    def table(self, signature: bytes) -> bytes:
        off = self.addresses[signature] - self.base
        length = int.from_bytes(self.blob[off + 4:off + 8], "little")
        return self.blob[off:off + length]


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def build(base: int, limit: int, *, vcpus: int, lapic_addr: int, ioapic_addr: int,
          pci: dsdt.PciLayout, power: PowerRegisters, ged_gsi: int, ospm_port: int,
          device_nodes=()) -> AcpiTables:
    """All tables for a machine, laid out from ``base`` (the RSDP) up to ``limit``."""
    dsdt_table = tables.dsdt(dsdt.build(pci, ged_gsi=ged_gsi, ospm_port=ospm_port,
                                        device_nodes=device_nodes))
    # The SCI is level-triggered; say active high, as KVM's IOAPIC takes level 1 as asserted.
    sci = Override(irq=power.sci_irq, gsi=power.sci_irq, flags=tables.INTI_LEVEL_HIGH)
    madt = tables.madt(vcpus, lapic_addr, ioapic_id=vcpus, ioapic_addr=ioapic_addr,
                       overrides=(TIMER_OVERRIDE, sci))
    xsdt_addr = base + _align(tables.RSDP_SIZE)
    xsdt_size = tables.HEADER_SIZE + 8 * 2
    facs_addr = -(-(xsdt_addr + xsdt_size) // 64) * 64
    fadt_addr = facs_addr + _align(tables.FACS_SIZE)
    madt_addr = fadt_addr + _align(tables.FADT_SIZE)
    dsdt_addr = madt_addr + _align(len(madt))
    end = dsdt_addr + len(dsdt_table)
    if end > limit:
        raise AcpiLayoutError(f"ACPI tables need {end - base} bytes at {base:#x}, "
                              f"only {limit - base} are reserved")
    placed = {b"RSDP": (base, tables.rsdp(xsdt_addr)),
              b"XSDT": (xsdt_addr, tables.xsdt([fadt_addr, madt_addr])),
              b"FACS": (facs_addr, tables.facs()),
              b"FACP": (fadt_addr, tables.fadt(dsdt_addr, facs_addr, power)),
              b"APIC": (madt_addr, madt),
              b"DSDT": (dsdt_addr, dsdt_table)}
    blob = bytearray(end - base)
    for addr, data in placed.values():
        blob[addr - base:addr - base + len(data)] = data
    return AcpiTables(base, bytes(blob), base, {sig: addr for sig, (addr, _d) in placed.items()})
