"""What loading a kernel into guest memory produced."""
from __future__ import annotations

from typing import NamedTuple

from . import layout


class KernelImage(NamedTuple):
    entry: int                    # guest-physical 64-bit entry point
    start: int                    # lowest guest-physical byte the kernel occupies
    end: int                      # first byte past the kernel (initrd goes above it)
    how: str                      # which boot path was taken, for the log
    header: bytes | None = None   # bzImage setup header, bytes 0x1F1..end, for the zero page
    code32_start: int | None = None
    cmdline_size: int = layout.DEFAULT_CMDLINE_SIZE
    initrd_addr_max: int = layout.DEFAULT_INITRD_ADDR_MAX


def map_file(path) -> "mmap.mmap | bytes":
    """The whole file, mapped read-only: the header checks and the loader read
    the page cache directly, and only the loader's copy into guest memory
    moves the bytes (a read() would copy them once more, into a heap buffer
    as large as the kernel).  An empty file gives ``b""``; OSError as open()."""
    import mmap
    import os
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return b""
        # MAP_POPULATE: one call maps every cached page, instead of a fault per page
        flags = mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
