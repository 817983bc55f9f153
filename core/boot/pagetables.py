"""The boot GDT and the identity map (first 4 GiB, 2 MiB pages) for the 64-bit entry."""
from __future__ import annotations

import struct
from typing import NamedTuple

from . import layout

CODE64 = 0x00AF9B000000FFFF   # 0x10: 64-bit code, present, execute/read, 4 GiB flat
DATA = 0x00CF93000000FFFF     # 0x18: data, present, read/write, 4 GiB flat
TSS64 = 0x00808B0000000000    # 0x20: 64-bit busy TSS (low half; the high half is 0)
GDT = (0, 0, CODE64, DATA, TSS64, 0)

PRESENT = 0x1
WRITABLE = 0x2
PAGE_SIZE_2M = 0x80           # PS bit in a page-directory entry
TABLE_FLAGS = PRESENT | WRITABLE
LARGE_PAGE_FLAGS = PRESENT | WRITABLE | PAGE_SIZE_2M


class Descriptor(NamedTuple):
    """A decoded segment descriptor, in the terms of struct kvm_segment."""
    base: int
    limit: int     # in bytes - 1, granularity applied
    type: int
    s: int
    dpl: int
    present: int
    avl: int
    l: int
    db: int
    g: int


def decode_descriptor(value: int) -> Descriptor:
    limit = (value & 0xFFFF) | ((value >> 32) & 0xF0000)
    g = (value >> 55) & 1
    return Descriptor(
        base=((value >> 16) & 0xFFFFFF) | ((value >> 32) & 0xFF000000),
        limit=(limit << 12) | 0xFFF if g else limit,
        type=(value >> 40) & 0xF, s=(value >> 44) & 1, dpl=(value >> 45) & 3,
        present=(value >> 47) & 1, avl=(value >> 52) & 1, l=(value >> 53) & 1,
        db=(value >> 54) & 1, g=g)


def segment(selector: int) -> Descriptor:
    """The descriptor behind one of the boot GDT's selectors (BOOT_CS, BOOT_DS, BOOT_TSS)."""
    return decode_descriptor(GDT[selector >> 3])


def write_gdt(mem) -> tuple[int, int]:
    """Write the GDT; return (base, limit)."""
    mem.write(layout.GDT_START, struct.pack(f"<{len(GDT)}Q", *GDT))
    return layout.GDT_START, len(GDT) * 8 - 1


def write_identity_map(mem) -> int:
    """PML4 -> one PDPT -> four page directories of 2 MiB pages; return cr3."""
    pml4 = bytearray(4096)
    struct.pack_into("<Q", pml4, 0, layout.PDPT_START | TABLE_FLAGS)
    pdpt = bytearray(4096)
    for i in range(layout.PD_COUNT):
        struct.pack_into("<Q", pdpt, i * 8, (layout.PD_START + i * 4096) | TABLE_FLAGS)
    pds = struct.pack(f"<{512 * layout.PD_COUNT}Q",
                      *((n << 21) | LARGE_PAGE_FLAGS for n in range(512 * layout.PD_COUNT)))
    mem.write(layout.PML4_START, pml4)
    mem.write(layout.PDPT_START, pdpt)
    mem.write(layout.PD_START, pds)
    return layout.PML4_START
