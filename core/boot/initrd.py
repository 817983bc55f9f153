"""Place the initrd: page-aligned, as high as the kernel allows, above the kernel."""
from __future__ import annotations

import os
from pathlib import Path

from . import layout
from .errors import BootError

PAGE = 4096


def place(size: int, kernel_end: int, low_ram_end: int, initrd_addr_max: int) -> int | None:
    """The highest page-aligned address for ``size`` bytes, or None if they do not fit.

    ``initrd_addr_max`` is the highest byte the initrd may occupy (setup header semantics).
    """
    top = min(initrd_addr_max + 1, low_ram_end)
    bottom = -(-kernel_end // PAGE) * PAGE
    addr = (top - size) // PAGE * PAGE
    return addr if size > 0 and addr >= bottom else None


def load(mem, path: Path, kernel_end: int, initrd_addr_max: int) -> tuple[int, int]:
    """Read ``path`` into guest memory; return (address, size)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise BootError(f"initrd {path} is empty: check [kernel] initrd")
            top = min(initrd_addr_max + 1, mem.ram_end_below_4g)
            addr = place(size, kernel_end, mem.ram_end_below_4g, initrd_addr_max)
            if addr is None:
                free = max(0, top - kernel_end)
                raise BootError(f"initrd {path} is {size} bytes ({size / layout.MIB:.1f} MiB) but only {free} bytes "
                                f"are free between the kernel's end {kernel_end:#x} and {top:#x}: "
                                f"give the machine more memory or use a smaller initrd")
            view = mem.view(addr, size)
            got = 0
            while got < size:
                n = f.readinto(view[got:])
                if not n:
                    raise BootError(f"initrd {path} shrank while being read ({got} of {size} bytes)")
                got += n
    except FileNotFoundError:
        raise BootError(f"initrd not found: {path} (check [kernel] initrd)") from None
    except OSError as exc:
        raise BootError(f"cannot read initrd {path}: {exc.strerror or exc} (check [kernel] initrd)") from None
    return addr, size
