"""Synthetic kernels (tiny ELF64 vmlinux, fake bzImages) for the boot tests, and tests of the ELF loader."""
from __future__ import annotations

import bz2
import gzip
import lzma
import struct

import pytest

from kvmkit.boot import BootError, elf, layout
from kvmkit.memory import GuestMemory

MIB = 1 << 20
KERNEL_PADDR = 0x1000000
KERNEL_VADDR = 0xFFFFFFFF81000000
TEXT = bytes(range(256)) * 4                 # 1 KiB of recognisable "code"
DATA = b"\xd7" * 256
DATA_PADDR = KERNEL_PADDR + 0x1000
DATA_MEMSZ = 0x3000                          # 256 file bytes, then bss
TINY_END = DATA_PADDR + DATA_MEMSZ


# -- builders -------------------------------------------------------------------------------
def make_elf(segments, entry, *, e_type=2, machine=62, ei_class=2, ei_data=1, notes=True) -> bytes:
    """An ELF64 with one PT_LOAD per (paddr, vaddr, data, memsz), plus a PT_NOTE to be skipped."""
    phdrs = [(1, paddr, vaddr, data, memsz) for paddr, vaddr, data, memsz in segments]
    if notes:
        phdrs.append((4, 0, 0, b"NOTE", 4))
    off = 64 + 56 * len(phdrs)
    table, body = b"", b""
    for p_type, paddr, vaddr, data, memsz in phdrs:
        table += struct.pack("<IIQQQQQQ", p_type, 5, off + len(body), vaddr, paddr, len(data), memsz, 0x1000)
        body += data
    ident = b"\x7fELF" + bytes((ei_class, ei_data, 1)) + bytes(9)
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", ident, e_type, machine, 1, entry, 64, 0, 0, 64, 56, len(phdrs), 64, 0, 0)
    return ehdr + table + body


def tiny_vmlinux(entry=KERNEL_PADDR, **kw) -> bytes:
    """Text at 16 MiB (linked at the usual high virtual address), then data + bss."""
    return make_elf([(KERNEL_PADDR, KERNEL_VADDR, TEXT, len(TEXT)),
                     (DATA_PADDR, KERNEL_VADDR + 0x1000, DATA, DATA_MEMSZ)], entry, **kw)


def _trailer(data: bytes) -> bytes:
    return struct.pack("<I", len(data) & 0xFFFFFFFF)


def lz4_legacy(data: bytes, chunk=64 * 1024, streams=1) -> bytes:
    import lz4.block
    magic = struct.pack("<I", 0x184C2102)
    out = b""
    half = len(data) // 2
    parts = [data] if streams == 1 else [data[:half], data[half:]]     # a second stream repeats the magic
    for part in parts:
        out += magic
        for i in range(0, len(part), chunk):
            block = lz4.block.compress(part[i:i + chunk], store_size=False, mode="high_compression")
            out += struct.pack("<I", len(block)) + block
    return out + _trailer(data)


def compress(kind: str, data: bytes) -> bytes:
    """``data`` compressed the way the kernel build does it, with the 4-byte size appended."""
    if kind == "gzip":
        return gzip.compress(data, 9) + _trailer(data)
    if kind == "xz":
        filters = [{"id": lzma.FILTER_X86}, {"id": lzma.FILTER_LZMA2, "preset": 6}]
        return lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32, filters=filters) \
            + bytes(8) + _trailer(data)                       # stream padding, then the size
    if kind == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_ALONE) + _trailer(data)
    if kind == "bzip2":
        return bz2.compress(data, 9) + _trailer(data)
    if kind == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=19).compress(data) + _trailer(data)
    if kind == "lz4":
        return lz4_legacy(data)
    raise ValueError(kind)


PM_HEAD = bytes(0x200) + b"\x0f\x0bSTARTUP64" + bytes(0x200 - 11)   # startup_32, then startup_64 at 0x200


def make_bzimage(payload: bytes, *, version=0x020F, setup_sects=4, xloadflags=0x3, loadflags=0x01,
                 pref=0x1000000, init_size=0x800000, relocatable=1, align=0x200000, cmdline_size=2047,
                 initrd_addr_max=0x7FFFFFFF, header_len=0x6A) -> bytes:
    """A bzImage: real-mode setup with a setup header, then a protected-mode part holding the payload."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes((0xEB, header_len))
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    struct.pack_into("<H", setup, 0x20E, 0x1234)              # kernel_version pointer: copied as is
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, align)
    setup[0x234] = relocatable
    if version >= 0x020C:
        struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    if version >= 0x0208:
        struct.pack_into("<II", setup, 0x248, len(PM_HEAD), len(payload))
    if version >= 0x020A:
        struct.pack_into("<QI", setup, 0x258, pref, init_size)
    return bytes(setup) + PM_HEAD + payload + b"\xcc" * 64


def protected_mode_part(image: bytes) -> bytes:
    return image[((image[0x1F1] or 4) + 1) * 512:]


@pytest.fixture
def mem():
    m = GuestMemory(32 * MIB, backing=bytearray(32 * MIB))
    yield m
    m.close()


# -- the ELF loader -------------------------------------------------------------------------
def test_loads_segments_at_physical_addresses_and_zeroes_bss(mem):
    mem.write(DATA_PADDR + 256, b"\xff" * (DATA_MEMSZ - 256))     # stale bytes where the bss goes
    img = elf.load(mem, tiny_vmlinux(), "vmlinux")
    assert (img.entry, img.start, img.end) == (KERNEL_PADDR, KERNEL_PADDR, TINY_END)
    assert mem.read(KERNEL_PADDR, len(TEXT)) == TEXT
    assert mem.read(DATA_PADDR, 256) == DATA
    assert mem.read(DATA_PADDR + 256, DATA_MEMSZ - 256) == bytes(DATA_MEMSZ - 256)
    assert img.header is None and img.code32_start is None


def test_high_virtual_entry_is_translated_through_its_segment(mem):
    img = elf.load(mem, tiny_vmlinux(entry=KERNEL_VADDR + 0x40), "vmlinux")
    assert img.entry == KERNEL_PADDR + 0x40
    img = elf.load(mem, tiny_vmlinux(entry=KERNEL_VADDR + 0x1010), "vmlinux")
    assert img.entry == DATA_PADDR + 0x10


def test_entry_outside_every_segment_is_rejected(mem):
    with pytest.raises(BootError, match="entry point"):
        elf.load(mem, tiny_vmlinux(entry=0x5000000), "vmlinux")


@pytest.mark.parametrize("kw, words", [
    ({"ei_class": 1}, "ELF64"),
    ({"ei_data": 2}, "little-endian"),
    ({"machine": 3}, "x86-64"),
    ({"e_type": 3}, "ET_EXEC"),
])
def test_wrong_kind_of_elf_is_rejected(mem, kw, words):
    with pytest.raises(BootError, match=words):
        elf.load(mem, tiny_vmlinux(**kw), "vmlinux")


def test_bad_magic_and_truncation_are_rejected(mem):
    with pytest.raises(BootError, match="not an ELF"):
        elf.load(mem, b"\x7fELG" + tiny_vmlinux()[4:], "vmlinux")
    image = tiny_vmlinux(notes=False)
    for cut in (10, 64, 64 + 56, len(image) - 300, len(image) - 1):
        with pytest.raises(BootError, match="vmlinux"):
            elf.load(mem, image[:cut], "vmlinux")


def test_elf_without_loadable_segment_is_rejected(mem):
    with pytest.raises(BootError, match="PT_LOAD"):
        elf.load(mem, make_elf([], KERNEL_PADDR), "vmlinux")


def test_segment_in_the_low_boot_area_is_rejected_and_nothing_is_written(mem):
    image = make_elf([(KERNEL_PADDR, KERNEL_PADDR, TEXT, len(TEXT)), (0x80000, 0x80000, b"x" * 16, 16)],
                     KERNEL_PADDR)
    with pytest.raises(BootError, match="below 1 MiB"):
        elf.load(mem, image, "vmlinux")
    assert mem.read(KERNEL_PADDR, len(TEXT)) == bytes(len(TEXT))


def test_kernel_larger_than_memory_names_both_sizes():
    small = GuestMemory(8 * MIB, backing=bytearray(8 * MIB))
    with pytest.raises(BootError, match=r"memory too small for the kernel: needs 17 MiB, machine has 8"):
        elf.load(small, tiny_vmlinux(), "/k/vmlinux")


def test_segment_in_the_pci_hole_is_outside_guest_ram():
    big = GuestMemory(4 << 30)           # anonymous mmap, untouched pages cost nothing
    try:
        image = make_elf([(0xC0100000, 0xC0100000, TEXT, len(TEXT))], 0xC0100000)
        with pytest.raises(BootError, match="outside guest RAM"):
            elf.load(big, image, "vmlinux")
    finally:
        big.close()


def test_huge_bss_does_not_allocate_before_checking():
    small = GuestMemory(32 * MIB, backing=bytearray(32 * MIB))
    image = make_elf([(KERNEL_PADDR, KERNEL_PADDR, TEXT, 1 << 60)], KERNEL_PADDR)
    with pytest.raises(BootError, match="outside guest RAM"):
        elf.load(small, image, "vmlinux")


def test_layout_constants_keep_boot_structures_below_the_kernel():
    fixed = [layout.GDT_START, layout.ZERO_PAGE_START, layout.SETUP_DATA_START, layout.PML4_START,
             layout.PDPT_START, layout.PD_START + layout.PD_COUNT * 4096 - 1,
             layout.CMDLINE_START + layout.CMDLINE_MAX_SIZE - 1, layout.MPTABLE_START]
    assert all(a < layout.HIGH_MEMORY_START for a in fixed)
    assert layout.PD_START + layout.PD_COUNT * 4096 == 0xF000
