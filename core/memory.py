"""Guest RAM: one anonymous mapping, split around the PCI hole below 4 GiB."""
from __future__ import annotations

import dataclasses
import mmap

from .plugin_api import GuestMemoryError

PCI_HOLE_START = 0xC000_0000     # RAM stops here when the guest has more than 3 GiB
FOUR_GIB = 1 << 32


@dataclasses.dataclass(frozen=True)
class Region:
    gpa: int          # guest-physical start
    size: int
    offset: int       # offset into the host mapping

    @property
    def end(self) -> int:
        return self.gpa + self.size


def layout(size: int) -> tuple[Region, ...]:
    """The RAM regions of a guest with ``size`` bytes of memory."""
    if size <= PCI_HOLE_START:
        return (Region(0, size, 0),)
    return (Region(0, PCI_HOLE_START, 0),
            Region(FOUR_GIB, size - PCI_HOLE_START, PCI_HOLE_START))


class GuestMemory:
    """Bounds-checked access to guest RAM.

    Accesses that are not wholly inside one RAM region raise
    :class:`GuestMemoryError` before touching anything.
    """

    def __init__(self, size: int, *, backing: bytearray | None = None):
        if size <= 0 or size % 4096:
            raise ValueError("guest memory size must be a positive multiple of 4 KiB")
        self.size = size
        self.regions = layout(size)
        if backing is not None:                      # tests: plain bytes, no mmap
            if len(backing) != size:
                raise ValueError("backing has the wrong size")
            self._map = None
            self._backing = backing
            self._buf = memoryview(backing)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self._map = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._buf = memoryview(self._map)

    # -- address translation -------------------------------------------------
    def _offset(self, gpa: int, length: int) -> int:
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"bad guest range {gpa:#x}+{length:#x}")
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + (gpa - r.gpa)
        raise GuestMemoryError(f"guest range {gpa:#x}+{length:#x} is outside guest RAM")

    def contains(self, gpa: int, length: int) -> bool:
        try:
            self._offset(gpa, length)
        except GuestMemoryError:
            return False
        return True

    @property
    def ram_end_below_4g(self) -> int:
        return self.regions[0].end

    # -- access ------------------------------------------------------------------
    def view(self, gpa: int, length: int) -> memoryview:
        off = self._offset(gpa, length)
        return self._buf[off:off + length]

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write(self, gpa: int, data) -> None:
        data = memoryview(data).cast("B")
        off = self._offset(gpa, len(data))
        self._buf[off:off + len(data)] = data

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def host_buffer(self):
        """The host mapping (for registering memory slots with KVM, and for C
        code that keeps a pointer into guest RAM).  The mapping or the backing
        object itself, never a memoryview of it: the garbage collector may clear
        a memoryview in a reference cycle while C still holds its export, which
        frees the RAM under the pointer."""
        return self._map if self._map is not None else self._backing

    def close(self) -> None:
        self._buf.release()
        if self._map is not None:
            self._map.close()
