"""The zero page (struct boot_params), the setup_data RNG seed and the command line."""
from __future__ import annotations

import os
import struct

from . import layout
from .errors import BootError

ZERO_PAGE_SIZE = 4096

# struct boot_params offsets (Documentation/x86/zero-page.rst, boot.rst)
ACPI_RSDP_ADDR = 0x070        # u64
EXT_RAMDISK_IMAGE = 0x0C0     # u32, high half of ramdisk_image
EXT_RAMDISK_SIZE = 0x0C4      # u32
EXT_CMD_LINE_PTR = 0x0C8      # u32
E820_ENTRIES = 0x1E8          # u8
SETUP_HEADER = 0x1F1
BOOT_FLAG = 0x1FE             # u16 0xAA55
JUMP = 0x200                  # 0xEB, header length - 2
HEADER = 0x202                # "HdrS"
VERSION = 0x206               # u16
TYPE_OF_LOADER = 0x210        # u8
LOADFLAGS = 0x211             # u8
CODE32_START = 0x214          # u32
RAMDISK_IMAGE = 0x218         # u32
RAMDISK_SIZE = 0x21C          # u32
HEAP_END_PTR = 0x224          # u16
CMD_LINE_PTR = 0x228          # u32
INITRD_ADDR_MAX = 0x22C       # u32
KERNEL_ALIGNMENT = 0x230      # u32
CMDLINE_SIZE = 0x238          # u32
SETUP_DATA = 0x250            # u64
E820_TABLE = 0x2D0            # 20-byte entries
E820_MAX_ENTRIES = 128

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
LOADER_UNDEFINED = 0xFF
HEAP_END = 0xFE00
MINIMAL_VERSION = 0x020F

SETUP_RNG_SEED = 9
RNG_SEED_SIZE = 32


def minimal_header() -> bytes:
    """A setup header for a kernel booted from a bare vmlinux (no bzImage header to copy)."""
    page = bytearray(0x268)
    struct.pack_into("<H", page, BOOT_FLAG, 0xAA55)
    page[JUMP:JUMP + 2] = bytes((0xEB, 0x268 - 0x202))
    page[HEADER:HEADER + 4] = b"HdrS"
    struct.pack_into("<H", page, VERSION, MINIMAL_VERSION)
    struct.pack_into("<I", page, INITRD_ADDR_MAX, layout.DEFAULT_INITRD_ADDR_MAX)
    struct.pack_into("<I", page, KERNEL_ALIGNMENT, layout.DEFAULT_KERNEL_ALIGNMENT)
    struct.pack_into("<I", page, CMDLINE_SIZE, layout.DEFAULT_CMDLINE_SIZE)
    return bytes(page[SETUP_HEADER:])


def rng_seed_node(seed: bytes | None = None) -> bytes:
    """A SETUP_RNG_SEED setup_data node: u64 next = 0, u32 type, u32 len, data."""
    seed = os.urandom(RNG_SEED_SIZE) if seed is None else seed
    return struct.pack("<QII", 0, SETUP_RNG_SEED, len(seed)) + seed


def build_zero_page(*, header: bytes | None, cmdline_addr: int, initrd: tuple[int, int] | None,
                    e820_table: bytes, e820_count: int, setup_data: int = 0,
                    code32_start: int | None = None, acpi_rsdp_addr: int = 0) -> bytes:
    """struct boot_params: the kernel's setup header (or a minimal one) plus what the loader fills in."""
    if e820_count > E820_MAX_ENTRIES or len(e820_table) > E820_MAX_ENTRIES * 20:
        raise BootError(f"memory map has {e820_count} entries, the zero page holds {E820_MAX_ENTRIES}")
    page = bytearray(ZERO_PAGE_SIZE)
    header = minimal_header() if header is None else header
    page[SETUP_HEADER:SETUP_HEADER + len(header)] = header
    page[TYPE_OF_LOADER] = LOADER_UNDEFINED
    page[LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", page, HEAP_END_PTR, HEAP_END)
    if code32_start is not None:
        struct.pack_into("<I", page, CODE32_START, code32_start)
    _split(page, CMD_LINE_PTR, EXT_CMD_LINE_PTR, cmdline_addr)
    addr, size = initrd if initrd else (0, 0)
    _split(page, RAMDISK_IMAGE, EXT_RAMDISK_IMAGE, addr)
    _split(page, RAMDISK_SIZE, EXT_RAMDISK_SIZE, size)
    struct.pack_into("<Q", page, SETUP_DATA, setup_data)
    struct.pack_into("<Q", page, ACPI_RSDP_ADDR, acpi_rsdp_addr)
    page[E820_ENTRIES] = e820_count
    page[E820_TABLE:E820_TABLE + len(e820_table)] = e820_table
    return bytes(page)


def _split(page: bytearray, low_off: int, high_off: int, value: int) -> None:
    struct.pack_into("<I", page, low_off, value & 0xFFFFFFFF)
    struct.pack_into("<I", page, high_off, value >> 32)


def encode_cmdline(cmdline: str, max_len: int) -> bytes:
    """The command line as the kernel reads it, zero-terminated; BootError when it cannot fit."""
    raw = cmdline.encode("utf-8")
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL character: remove it")
    limit = min(max_len, layout.CMDLINE_MAX_SIZE - 1)
    if len(raw) > limit:
        raise BootError(f"kernel command line is {len(raw)} bytes, the kernel accepts at most {limit}: shorten it")
    return raw + b"\0"
