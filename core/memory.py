"""Guest RAM: one mapping (anonymous, or a snapshot's memory file mapped
copy-on-write), split around the PCI hole below 4 GiB."""
from __future__ import annotations

import mmap
import os
from typing import NamedTuple

from .plugin_api import GuestMemoryError

PCI_HOLE_START = 0xC000_0000     # RAM stops here when the guest has more than 3 GiB
FOUR_GIB = 1 << 32


class Region(NamedTuple):
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
            self._map = backing
            self._buf = memoryview(backing)
        else:
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
            self._map = mmap.mmap(-1, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            self._buf = memoryview(self._map)
        self.file_backed = False

    @classmethod
    def from_file(cls, path, size: int) -> "GuestMemory":
        """Guest RAM whose contents are the file at ``path`` (a snapshot's
        memory), mapped MAP_PRIVATE: nothing is read until the guest touches
        a page, the guest's writes stay in this process, and every guest
        mapped from one file shares its unwritten pages in the page cache.
        The file must be exactly ``size`` bytes (ValueError says otherwise)."""
        if size <= 0 or size % 4096:
            raise ValueError("guest memory size must be a positive multiple of 4 KiB")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            actual = os.fstat(fd).st_size
            if actual != size:
                raise ValueError(f"{path}: {actual} bytes, the guest has {size} bytes of memory")
            flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_NORESERVE", 0)
            mapping = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        memory = cls.__new__(cls)
        memory.size = size
        memory.regions = layout(size)
        memory._map = mapping
        memory._buf = memoryview(mapping)
        memory.file_backed = True
        return memory

    def save(self, fd: int, chunk: int = 2 << 20) -> None:
        """Write all of guest RAM to ``fd`` (at its start, truncated to the
        size): chunks that are all zero are left as holes (a sparse file)."""
        zero = bytes(chunk)
        buf = self._buf
        os.ftruncate(fd, 0)
        for at in range(0, self.size, chunk):
            piece = buf[at:at + chunk].tobytes()     # (comparing a memoryview is 50x slower)
            if piece != zero[:len(piece)]:
                os.lseek(fd, at, os.SEEK_SET)
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view):]
        os.ftruncate(fd, self.size)

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

    def zero(self, gpa: int, length: int) -> None:
        """Zero a range.  Whole pages of the anonymous mapping are given back
        to the kernel (MADV_DONTNEED: they read as zero again and take no
        host memory until the guest touches them); only partial pages at the
        ends are written.  (Memory mapped from a file is written: there
        MADV_DONTNEED would bring back the file's contents.)"""
        off = self._offset(gpa, length)
        end = off + length
        if isinstance(self._map, mmap.mmap) and not self.file_backed:
            first = -(-off // mmap.PAGESIZE) * mmap.PAGESIZE
            last = end // mmap.PAGESIZE * mmap.PAGESIZE
            if last > first:
                self._map.madvise(mmap.MADV_DONTNEED, first, last - first)
                self._buf[off:first] = bytes(first - off)
                self._buf[last:end] = bytes(end - last)
                return
        self._buf[off:end] = bytes(length)

    def read_int(self, gpa: int, size: int) -> int:
        return int.from_bytes(self.view(gpa, size), "little")

    def write_int(self, gpa: int, size: int, value: int) -> None:
        self.write(gpa, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def host_buffer(self):
        """The host mapping (for registering memory slots with KVM)."""
        # The object itself, never the memoryview: a C queue's export of a
        # memoryview that the garbage collector clears in a cycle (device <->
        # transport) crashes the process when the export is released.
        return self._map

    def close(self) -> None:
        self._buf.release()
        if isinstance(self._map, mmap.mmap):
            self._map.close()
