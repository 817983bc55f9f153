"""Address allocation for BARs, done by the VMM before boot as firmware would.

Linux booted without a BIOS keeps BAR addresses it finds already assigned
(when they lie inside the root bus's windows), so the VMM assigns every BAR
once and the guest leaves them there.

Ranges are naturally aligned (a BAR of size S starts at a multiple of S, as
the BAR's read-only low address bits require).  Memory ranges take whole
4 KiB pages, so no two functions share a page and each range can be mapped
or trapped on its own.  The first free gap that fits is used, so alignment
padding is reused by later, smaller ranges.
"""
from __future__ import annotations

import bisect

from ..boot.layout import IOAPIC_ADDR
from ..memory import PCI_HOLE_START
from .config_space import ConfigSpace

MMIO_WINDOW_START = PCI_HOLE_START   # 0xC000_0000: RAM never reaches here
MMIO_WINDOW_END = IOAPIC_ADDR        # 0xFEC0_0000: the IOAPIC and LAPIC pages follow
IO_WINDOW_START = 0xC000
IO_WINDOW_END = 0x1_0000
PAGE_SIZE = 4096


class AllocationError(Exception):
    """The window has no free naturally aligned range of the requested size."""


class _RangeAllocator:
    space = "?"
    granule = 1

    def __init__(self, start: int, end: int):
        if not 0 <= start < end:
            raise ValueError(f"bad {self.space} window {start:#x}-{end:#x}")
        self.start, self.end = start, end
        self._bases: list[int] = []
        self._ends: list[int] = []

    def allocate(self, size: int) -> int:
        """A naturally aligned range of ``size`` bytes (a power of two; ranges
        smaller than the granule take a whole granule)."""
        if size <= 0 or size & (size - 1):
            raise AllocationError(f"{self.space} size {size:#x} is not a power of two")
        size = max(size, self.granule)
        candidate = self._align(self.start, size)
        for base, end in zip(self._bases, self._ends):
            if candidate + size <= base:
                break
            candidate = max(candidate, self._align(end, size))
        if candidate + size > self.end:
            raise AllocationError(
                f"the {self.space} window {self.start:#x}-{self.end - 1:#x} has no free "
                f"{size:#x}-byte range aligned to its size ({self.used:#x} bytes in use)")
        i = bisect.bisect_left(self._bases, candidate)
        self._bases.insert(i, candidate)
        self._ends.insert(i, candidate + size)
        return candidate

    @staticmethod
    def _align(address: int, size: int) -> int:
        return (address + size - 1) & ~(size - 1)

    @property
    def used(self) -> int:
        return sum(e - b for b, e in zip(self._bases, self._ends))

    def allocations(self) -> list[tuple[int, int]]:
        """(base, size) of every range handed out, by address."""
        return [(b, e - b) for b, e in zip(self._bases, self._ends)]


class IoAllocator(_RangeAllocator):
    space = "I/O port"
    granule = 4

    def __init__(self, start: int = IO_WINDOW_START, end: int = IO_WINDOW_END):
        super().__init__(start, end)


class MmioAllocator(_RangeAllocator):
    space = "MMIO"
    granule = PAGE_SIZE

    def __init__(self, start: int = MMIO_WINDOW_START, end: int = MMIO_WINDOW_END):
        super().__init__(start, end)

    def assign_bars(self, config: ConfigSpace, io: IoAllocator | None = None) -> dict[int, int]:
        """Give every BAR of ``config`` an address (largest first, which packs
        best); returns {bar_index: address}.  I/O BARs need ``io``."""
        bars = sorted(config.bars(), key=lambda b: (-b.size, b.index))
        if io is None and any(not b.is_memory for b in bars):
            raise AllocationError("the function has I/O BARs but no IoAllocator was given")
        assigned = {}
        for bar in bars:
            address = self.allocate(bar.size) if bar.is_memory else io.allocate(bar.size)
            config.set_bar_address(bar.index, address)
            assigned[bar.index] = address
        return assigned
