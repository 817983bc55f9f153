"""The BIOS-style e820 memory map handed to the kernel in the zero page."""
from __future__ import annotations

import struct

from . import layout

E820_RAM = 1
E820_RESERVED = 2
_ENTRY = struct.Struct("<QQI")   # addr, size, type: 20 bytes


def e820_map(regions) -> list[tuple[int, int, int]]:
    """(addr, size, type) entries for guest RAM laid out as ``regions`` (GuestMemory.regions).

    The first region starts at 0; later regions are RAM above the PCI hole.
    """
    low_end = regions[0].end
    entries = [(0, min(layout.EBDA_START, low_end), E820_RAM),
               (layout.EBDA_START, layout.EBDA_END - layout.EBDA_START, E820_RESERVED),
               (layout.BIOS_START, layout.HIGH_MEMORY_START - layout.BIOS_START, E820_RESERVED)]
    if low_end > layout.HIGH_MEMORY_START:
        entries.append((layout.HIGH_MEMORY_START, low_end - layout.HIGH_MEMORY_START, E820_RAM))
    # the reset vector's page, as firmware reserves its ROM there (no PCI BAR goes on it)
    entries.append((layout.RESET_PAGE, layout.RESET_PAGE_SIZE, E820_RESERVED))
    entries.extend((r.gpa, r.size, E820_RAM) for r in regions[1:])
    return entries


def pack_e820(entries) -> bytes:
    """The entries as struct e820_entry records for the zero page's e820_table."""
    return b"".join(_ENTRY.pack(addr, size, kind) for addr, size, kind in entries)
