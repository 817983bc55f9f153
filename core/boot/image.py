"""What loading a kernel into guest memory produced."""
from __future__ import annotations

from dataclasses import dataclass

from . import layout


@dataclass(frozen=True)
class KernelImage:
    entry: int                    # guest-physical 64-bit entry point
    start: int                    # lowest guest-physical byte the kernel occupies
    end: int                      # first byte past the kernel (initrd goes above it)
    how: str                      # which boot path was taken, for the log
    header: bytes | None = None   # bzImage setup header, bytes 0x1F1..end, for the zero page
    code32_start: int | None = None
    cmdline_size: int = layout.DEFAULT_CMDLINE_SIZE
    initrd_addr_max: int = layout.DEFAULT_INITRD_ADDR_MAX
