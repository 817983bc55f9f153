"""Intel MultiProcessor Specification 1.4 table: how the guest finds its CPUs and IOAPIC."""
from __future__ import annotations

import struct
from typing import NamedTuple, Sequence

from . import layout
from .errors import BootError

SPEC_REV = 4
LAPIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
CPU_SIGNATURE = 0x000006F1     # family 6, model 15, stepping 1
CPU_FEATURES = 0x00000201      # FPU | APIC
CPU_ENABLED = 0x1
CPU_BSP = 0x2
BUS_PCI, BUS_ISA = 0, 1
ISA_IRQS = 16
INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_EXTINT = 0, 1, 3
ALL_LAPICS = 0xFF

ENTRY_PROCESSOR, ENTRY_BUS, ENTRY_IOAPIC, ENTRY_IO_INTERRUPT, ENTRY_LOCAL_INTERRUPT = range(5)
FLOATING_SIZE = 16
CONFIG_HEADER_SIZE = 44


class MpTable(NamedTuple):
    floating: bytes       # "_MP_" floating pointer, 16 bytes, checksummed
    config: bytes         # "PCMP" configuration table, checksummed
    entry_count: int

    @property
    def data(self) -> bytes:
        """Both structures as written: the configuration table follows the floating pointer."""
        return self.floating + self.config


def checksum(data: bytes) -> int:
    """Sum of the bytes mod 256: 0 for a correctly checksummed MP structure."""
    return sum(data) & 0xFF


def _fix(data: bytearray, offset: int) -> bytes:
    data[offset] = (-sum(data)) & 0xFF
    return bytes(data)


PCI_INT_FLAGS = 0x0D          # active high, level triggered (KVM's IOAPIC takes level 1 as asserted)


def _entries(vcpus: int, pci_irqs: Sequence[tuple[int, int, int]] = ()) -> list[bytes]:
    ioapic_id = vcpus
    out = [struct.pack("<BBBBII8x", ENTRY_PROCESSOR, i, LAPIC_VERSION,
                       CPU_ENABLED | (CPU_BSP if i == 0 else 0), CPU_SIGNATURE, CPU_FEATURES)
           for i in range(vcpus)]
    out.append(struct.pack("<BB6s", ENTRY_BUS, BUS_PCI, b"PCI   "))
    out.append(struct.pack("<BB6s", ENTRY_BUS, BUS_ISA, b"ISA   "))
    out.append(struct.pack("<BBBBI", ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1, layout.IOAPIC_ADDR))
    # ISA IRQ n -> IOAPIC pin n: KVM's default GSI routing sends GSI n to pin n.
    out.extend(struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, BUS_ISA, irq, ioapic_id, irq)
               for irq in range(ISA_IRQS))
    # PCI INTx: source irq is (device << 2) | (pin - 1); the pin is the GSI the device raises.
    out.extend(struct.pack("<BBHBBBB", ENTRY_IO_INTERRUPT, INT_TYPE_INT, PCI_INT_FLAGS, BUS_PCI,
                           (device << 2) | (pin - 1), ioapic_id, gsi)
               for device, pin, gsi in pci_irqs)
    out.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, BUS_ISA, 0, ALL_LAPICS, 0))
    out.append(struct.pack("<BBHBBBB", ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, BUS_ISA, 0, ALL_LAPICS, 1))
    return out


def table_size(vcpus: int, pci_irqs: Sequence[tuple[int, int, int]] = ()) -> int:
    return FLOATING_SIZE + CONFIG_HEADER_SIZE + sum(map(len, _entries(vcpus, pci_irqs)))


def max_vcpus() -> int:
    """The most vCPUs whose MP table fits in the EBDA."""
    fixed = table_size(1) - 20
    return (layout.EBDA_END - layout.MPTABLE_START - fixed) // 20


def build(vcpus: int, base: int = layout.MPTABLE_START,
          pci_irqs: Sequence[tuple[int, int, int]] = ()) -> MpTable:
    """``pci_irqs``: (device number, interrupt pin 1-4, GSI) of each PCI function on bus 0."""
    if vcpus < 1:
        raise BootError(f"the machine needs at least 1 vCPU, not {vcpus}")
    if base + table_size(vcpus, pci_irqs) > layout.EBDA_END:
        raise BootError(f"the MP table for {vcpus} vCPUs does not fit in the EBDA at {base:#x}: "
                        f"use at most {max_vcpus()} vCPUs")
    entries = _entries(vcpus, pci_irqs)
    body = b"".join(entries)
    config = bytearray(struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", CONFIG_HEADER_SIZE + len(body),
                                   SPEC_REV, 0, b"KVMKIT  ", b"KVMKIT VM   ", 0, 0, len(entries),
                                   layout.LAPIC_ADDR, 0, 0, 0) + body)
    floating = bytearray(struct.pack("<4sIBBBB4x", b"_MP_", base + FLOATING_SIZE, 1, SPEC_REV, 0, 0))
    return MpTable(floating=_fix(floating, 10), config=_fix(config, 7), entry_count=len(entries))


def write(mem, table: MpTable) -> None:
    """Write a table from :func:`build` into the EBDA and point the BIOS data area at the EBDA."""
    mem.write(layout.MPTABLE_START, table.data)
    mem.write_int(layout.BDA_EBDA_SEGMENT, 2, layout.EBDA_START >> 4)
    mem.write_int(layout.BDA_BASE_MEMORY_KIB, 2, layout.EBDA_START // layout.KIB)
