"""What every PC chipset has and a guest's restart relies on: the reset
control register at port 0xCF9 and a reset vector that uses it.

kvmkit ships no firmware, so without these a guest that restarts the way a
PC BIOS expects (Linux ``reboot=p``/``pci``, ``reboot=b``/``bios``, the
ACPI reset register, its fallback chain, a bootloader's ``ljmp`` to
F000:FFF0) would run into nothing and spin.  This lives in the core, not in
a plugin: 0xCF9 is a byte inside the core's PCI CONFIG_ADDRESS dword
(0xCF8-0xCFB, as on Intel chipsets), the reset vector sits in the memory
layout the core owns, and the core's ACPI tables point at the register, so
every machine has them whatever plugins it names.

Reset control (0xCF9, 8 bits, as Intel's PIIX/ICH): bit 1 SYS_RST (hard
reset when set), bit 2 RST_CPU (a reset happens when this bit is written as
1), bit 3 FULL_RST.  Bits 1 and 3 read back; any write with RST_CPU set ends
the VM as a guest reset (status 0).

The reset vector: :data:`RESET_STUB` is 11 bytes that encode the same
instructions in 16-, 32- and 64-bit mode (only 8-bit register moves, ``out
dx, al``, ``cli``, ``hlt`` and a short jump)::

    mov al, 0x06 ; mov dh, 0x0c ; mov dl, 0xf9 ; out dx, al ; cli ; hlt ; jmp $-3

kvmkit writes it at the real-mode vector F000:FFF0 (guest-physical
0xFFFF0, inside RAM, in the BIOS area e820 reserves) and at the architectural
one, 0xFFFFFFF0, on a page of its own mapped at the top of the 4 GiB space.
"""
from __future__ import annotations

import logging
import mmap
from typing import Callable

from .boot import layout

log = logging.getLogger("kvmkit.chipset")

RESET_CONTROL_PORT = 0xCF9
SYS_RST = 1 << 1
RST_CPU = 1 << 2
FULL_RST = 1 << 3
RESET_VALUE = SYS_RST | RST_CPU          # what the ACPI FADT's RESET_VALUE says (as on PCs)

REAL_MODE_VECTOR = 0xFFFF0               # F000:FFF0
RESET_VECTOR = 0xFFFF_FFF0               # where a CPU starts after reset
RESET_PAGE = layout.RESET_PAGE           # the page kvmkit maps there (e820 reserves it)
PAGE = layout.RESET_PAGE_SIZE
assert RESET_PAGE == RESET_VECTOR & ~(PAGE - 1)

RESET_STUB = bytes([
    0xB0, RESET_VALUE,                   # mov al, 0x06
    0xB6, RESET_CONTROL_PORT >> 8,       # mov dh, 0x0c
    0xB2, RESET_CONTROL_PORT & 0xFF,     # mov dl, 0xf9
    0xEE,                                # out dx, al
    0xFA,                                # cli
    0xF4,                                # hlt
    0xEB, 0xFD,                          # jmp back to hlt
])
assert len(RESET_STUB) <= 16


class ResetControl:
    """The reset control register.  ``stop(reason, code)`` is the machine's request_stop."""

    def __init__(self, stop: Callable[[str, int], None]):
        self._stop = stop
        self.value = 0

    def read(self, offset: int, size: int) -> int:
        return self.value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if value & RST_CPU:
            kind = "hard" if value & (SYS_RST | FULL_RST) else "soft"
            self._stop(f"guest reset (port 0xCF9, {kind})", 0)
        self.value = value & (SYS_RST | FULL_RST)

    def save_state(self) -> dict:
        return {"value": self.value}

    def restore_state(self, state: dict) -> None:
        self.value = int(state["value"]) & (SYS_RST | FULL_RST)


def reset_page() -> mmap.mmap:
    """A page holding the stub at its last 16 bytes, to map at :data:`RESET_PAGE`."""
    page = mmap.mmap(-1, PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
    at = RESET_VECTOR - RESET_PAGE
    page[at:at + len(RESET_STUB)] = RESET_STUB
    return page


def install_reset_vector(memory) -> None:
    """Write the stub at F000:FFF0 when guest RAM covers it (it always does at 16 MiB and up)."""
    if memory.contains(REAL_MODE_VECTOR, len(RESET_STUB)):
        memory.write(REAL_MODE_VECTOR, RESET_STUB)
