"""load_linux end to end (no KVM): the zero page, command line, initrd, RNG seed, errors, logging."""
from __future__ import annotations

import glob
import logging
import random
import struct

import pytest

from kvmkit.boot import BootError, BootSetup, initrd, layout, load_linux, params
from kvmkit.boot.e820 import E820_RAM, E820_RESERVED
from kvmkit.memory import GuestMemory

try:
    from . import test_boot_images as images
except ImportError:
    import test_boot_images as images

MIB = 1 << 20
ZP = layout.ZERO_PAGE_START


@pytest.fixture
def mem():
    m = GuestMemory(64 * MIB, backing=bytearray(64 * MIB))
    yield m
    m.close()


@pytest.fixture
def vmlinux(tmp_path):
    p = tmp_path / "vmlinux"
    p.write_bytes(images.tiny_vmlinux())
    return p


@pytest.fixture
def bzimage_gz(tmp_path):
    p = tmp_path / "bzImage"
    p.write_bytes(images.make_bzimage(images.compress("gzip", images.tiny_vmlinux()), cmdline_size=255))
    return p


def zp(mem, off, size):
    return mem.read_int(ZP + off, size)


def test_boot_setup_for_a_vmlinux(mem, vmlinux):
    setup = load_linux(mem, vmlinux, None, "console=ttyS0", 1)
    assert setup == BootSetup(entry=0x1000000, boot_params=0x7000, cr3=0x9000, gdt_base=0x500,
                              gdt_limit=6 * 8 - 1, kernel_start=0x1000000, kernel_end=images.TINY_END)


def test_zero_page_for_a_vmlinux_has_a_minimal_header(mem, vmlinux):
    load_linux(mem, vmlinux, None, "console=ttyS0", 1)
    assert zp(mem, 0x1FE, 2) == 0xAA55
    assert mem.read(ZP + 0x202, 4) == b"HdrS"
    assert zp(mem, 0x206, 2) == 0x020F
    assert zp(mem, 0x230, 4) == 0x200000                 # kernel_alignment
    assert zp(mem, 0x238, 4) == 2047                     # cmdline_size: COMMAND_LINE_SIZE - 1
    assert zp(mem, 0x210, 1) == 0xFF                     # type_of_loader
    assert zp(mem, 0x211, 1) == 0x81                     # LOADED_HIGH | CAN_USE_HEAP
    assert zp(mem, 0x224, 2) == 0xFE00                   # heap_end_ptr
    assert zp(mem, 0x228, 4) == 0x20000 and zp(mem, 0x0C8, 4) == 0
    assert zp(mem, 0x218, 4) == 0 and zp(mem, 0x21C, 4) == 0
    assert zp(mem, 0x250, 8) == 0x8000                   # setup_data
    assert zp(mem, 0x070, 8) == 0                        # acpi_rsdp_addr
    assert zp(mem, 0x214, 4) == 0                        # code32_start untouched
    assert zp(mem, 0x1EF, 1) == 0                        # sentinel stays clear


def test_zero_page_for_a_bzimage_copies_its_setup_header(mem, bzimage_gz):
    mem.write(ZP, b"\xee" * 4096)                        # stale data must not survive
    load_linux(mem, bzimage_gz, None, "quiet", 2, acpi_rsdp_addr=0xF0010)
    image = bzimage_gz.read_bytes()
    page = bytearray(mem.read(ZP, 4096))
    assert page[0x20E:0x210] == image[0x20E:0x210]       # kernel_version, copied
    assert zp(mem, 0x206, 2) == 0x020F
    assert zp(mem, 0x238, 4) == 255
    assert zp(mem, 0x248, 4) == len(images.PM_HEAD)      # payload_offset, copied
    assert zp(mem, 0x210, 1) == 0xFF and zp(mem, 0x211, 1) == 0x81
    assert zp(mem, 0x070, 8) == 0xF0010
    assert page[0x26C:0x2D0] == bytes(0x2D0 - 0x26C)     # past the header: zero
    assert page[:0x70] == bytes(0x70)


def test_e820_in_the_zero_page(mem, vmlinux):
    load_linux(mem, vmlinux, None, "", 1)
    count = zp(mem, 0x1E8, 1)
    entries = [struct.unpack_from("<QQI", mem.read(ZP + 0x2D0 + 20 * i, 20)) for i in range(count)]
    assert entries == [(0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED),
                       (0xF0000, 0x10000, E820_RESERVED), (0x100000, 63 * MIB, E820_RAM),
                       (0xFFFF_F000, 0x1000, E820_RESERVED)]           # the reset vector's page


def test_rng_seed_setup_data_node(mem, vmlinux):
    load_linux(mem, vmlinux, None, "", 1)
    first = mem.read(0x8000, 48)
    nxt, kind, length = struct.unpack_from("<QII", first)
    assert (nxt, kind, length) == (0, 9, 32)
    load_linux(mem, vmlinux, None, "", 1)
    assert mem.read(0x8000 + 16, 32) != first[16:]       # fresh randomness each boot
    assert params.rng_seed_node(bytes(range(32))) == struct.pack("<QII", 0, 9, 32) + bytes(range(32))


def test_command_line_is_written_zero_terminated(mem, vmlinux):
    mem.write(0x20000, b"\xff" * 4096)
    line = b"console=ttyS0 root=/dev/vda"
    load_linux(mem, vmlinux, None, line.decode(), 1)
    assert mem.read(0x20000, len(line) + 1) == line + b"\0"
    assert mem.read(0x20000 + len(line), 4096 - len(line)) == bytes(4096 - len(line))


def test_command_line_limits(mem, vmlinux, bzimage_gz):
    load_linux(mem, vmlinux, None, "x" * 2047, 1)
    with pytest.raises(BootError, match="2048 bytes.*at most 2047"):
        load_linux(mem, vmlinux, None, "x" * 2048, 1)
    load_linux(mem, bzimage_gz, None, "y" * 255, 1)       # the header's cmdline_size is enforced
    with pytest.raises(BootError, match="256 bytes.*at most 255"):
        load_linux(mem, bzimage_gz, None, "y" * 256, 1)
    with pytest.raises(BootError, match="NUL"):
        load_linux(mem, vmlinux, None, "a\0b", 1)


def test_command_line_never_exceeds_its_4k_buffer():
    with pytest.raises(BootError, match="at most 4095"):
        params.encode_cmdline("z" * 4096, 100_000)


def test_initrd_is_placed_high_page_aligned_and_recorded(mem, vmlinux, tmp_path):
    rd = tmp_path / "initrd"
    rd.write_bytes(b"\x07" * 10_000)
    load_linux(mem, vmlinux, rd, "", 1)
    addr, size = zp(mem, 0x218, 4), zp(mem, 0x21C, 4)
    assert size == 10_000 and addr % 4096 == 0
    assert addr + size <= 64 * MIB and addr + size > 64 * MIB - 4096 * 3
    assert mem.read(addr, size) == rd.read_bytes()
    assert zp(mem, 0x0C0, 4) == 0 and zp(mem, 0x0C4, 4) == 0


def test_initrd_placement_bounds():
    kernel_end = 0x1004000
    assert initrd.place(0x1000, kernel_end, 64 * MIB, 0x7FFFFFFF) == 64 * MIB - 0x1000
    assert initrd.place(0x1001, kernel_end, 64 * MIB, 0x7FFFFFFF) == 64 * MIB - 0x2000
    assert initrd.place(0x1000, kernel_end, 4 << 30, 0x37FFFFFF) == 0x38000000 - 0x1000   # initrd_addr_max
    assert initrd.place(64 * MIB - kernel_end, kernel_end, 64 * MIB, 0x7FFFFFFF) == kernel_end
    assert initrd.place(64 * MIB - kernel_end + 1, kernel_end, 64 * MIB, 0x7FFFFFFF) is None
    assert initrd.place(0x1000, 0x1004000, 0x1005000, 0x7FFFFFFF) == 0x1004000
    assert initrd.place(0x1000, 0x1004001, 0x1005000, 0x7FFFFFFF) is None   # not in the kernel's last page
    assert initrd.place(0, kernel_end, 64 * MIB, 0x7FFFFFFF) is None


def test_initrd_too_big_names_the_file_and_sizes(mem, vmlinux, tmp_path):
    rd = tmp_path / "huge.cpio"
    rd.write_bytes(bytes(48 * MIB))
    with pytest.raises(BootError, match=r"initrd .*huge.cpio is 50331648 bytes \(48.0 MiB\) but only 50315264 bytes are free"):
        load_linux(mem, vmlinux, rd, "", 1)


def test_initrd_missing_unreadable_or_empty(mem, vmlinux, tmp_path):
    with pytest.raises(BootError, match=r"initrd not found: .*/nope \(check \[kernel\] initrd\)"):
        load_linux(mem, vmlinux, tmp_path / "nope", "", 1)
    with pytest.raises(BootError, match=r"cannot read initrd"):
        load_linux(mem, vmlinux, tmp_path, "", 1)            # a directory
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BootError, match="empty"):
        load_linux(mem, vmlinux, tmp_path / "empty", "", 1)


def test_initrd_above_4g_uses_the_ext_fields():
    page = params.build_zero_page(header=None, cmdline_addr=0x1_0002_0000, initrd=(0x1_2345_6000, 0x2_0000_0010),
                                  e820_table=b"", e820_count=0)
    assert struct.unpack_from("<II", page, 0x218) == (0x2345_6000, 0x10)
    assert struct.unpack_from("<III", page, 0x0C0) == (1, 2, 1)
    assert struct.unpack_from("<I", page, 0x228) == (0x20000,)


def test_zero_page_rejects_too_many_e820_entries():
    with pytest.raises(BootError, match="128"):
        params.build_zero_page(header=None, cmdline_addr=0, initrd=None, e820_table=b"", e820_count=129)


def test_missing_kernel_names_the_file(mem, tmp_path):
    with pytest.raises(BootError, match=r"kernel image not found: .*/x/y \(check \[kernel\] image\)"):
        load_linux(mem, tmp_path / "x" / "y", None, "", 1)
    with pytest.raises(BootError, match=r"cannot read kernel image"):
        load_linux(mem, tmp_path, None, "", 1)


def test_neither_elf_nor_bzimage(mem, tmp_path):
    p = tmp_path / "kernel.txt"
    p.write_bytes(b"#!/bin/sh\necho not a kernel\n")
    with pytest.raises(BootError, match="neither an ELF vmlinux nor a bzImage"):
        load_linux(mem, p, None, "", 1)


def test_bad_vcpu_counts_are_rejected_before_anything_is_written(mem, vmlinux):
    for n in (0, 100):
        with pytest.raises(BootError, match="vCPU"):
            load_linux(mem, vmlinux, None, "", n)
    assert mem.read(0x1000000, 16) == bytes(16)


def test_memory_below_1mib_is_rejected(vmlinux):
    tiny = GuestMemory(512 * 1024, backing=bytearray(512 * 1024))
    with pytest.raises(BootError, match="memory too small"):
        load_linux(tiny, vmlinux, None, "", 1)


def test_garbage_kernel_files_raise_only_boot_error(mem, tmp_path):
    rng = random.Random(5)
    good = images.tiny_vmlinux()
    cases = [good[:n] for n in range(0, len(good), 37)]
    for _ in range(100):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            bad[rng.randrange(4, 0x1A0)] = rng.randrange(256)
        cases.append(bytes(bad))
    path = tmp_path / "k"
    outcomes = set()
    for case in cases:
        path.write_bytes(case)
        try:
            load_linux(mem, path, None, "", 1)
            outcomes.add("ok")
        except BootError:
            outcomes.add("error")
    assert outcomes == {"ok", "error"}


def test_one_log_line_says_which_path(mem, vmlinux, tmp_path, caplog):
    fallback = tmp_path / "bzImage-lzo"
    fallback.write_bytes(images.make_bzimage(b"\x89LZO\x00\r\n\x1a\n" + bytes(64)))
    for kernel, words in ((vmlinux, "vmlinux ELF"), (fallback, "own decompressor")):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="kvmkit.boot"):
            load_linux(mem, kernel, None, "", 1)
        records = [r for r in caplog.records if r.name == "kvmkit.boot"]
        assert len(records) == 1 and words in records[0].getMessage()


def test_fallback_path_entry_and_code32_start(mem, tmp_path):
    k = tmp_path / "bzImage"
    k.write_bytes(images.make_bzimage(b"\x42" * 64, pref=0x1000000, init_size=0x800000))
    setup = load_linux(mem, k, None, "", 1)
    assert setup.entry == 0x1000200
    assert (setup.kernel_start, setup.kernel_end) == (0x1000000, 0x1800000)
    assert zp(mem, 0x214, 4) == 0x1000000


def test_four_gib_machine_keeps_the_initrd_below_initrd_addr_max(vmlinux, tmp_path):
    big = GuestMemory(4 << 30)              # anonymous mmap: only touched pages cost memory
    try:
        rd = tmp_path / "initrd"
        rd.write_bytes(b"\x01" * 5000)
        load_linux(big, vmlinux, rd, "", 2)
        addr = big.read_int(ZP + 0x218, 4)
        assert addr == 0x80000000 - 0x2000
        count = big.read_int(ZP + 0x1E8, 1)
        last = struct.unpack_from("<QQI", big.read(ZP + 0x2D0 + 20 * (count - 1), 20))
        assert last == (4 << 30, 1 << 30, E820_RAM)
    finally:
        big.close()


DEBIAN = sorted(glob.glob("/boot/vmlinuz-*"))


@pytest.mark.skipif(not DEBIAN, reason="no /boot/vmlinuz-* on this machine")
def test_debian_kernel_loads_as_its_decompressed_vmlinux():
    m = GuestMemory(256 * MIB)
    try:
        setup = load_linux(m, DEBIAN[-1], None, "console=ttyS0", 1)
        assert setup.entry == setup.kernel_start == 0x1000000
        assert setup.kernel_end > setup.kernel_start + 16 * MIB
        assert m.read(ZP + 0x202, 4) == b"HdrS" and m.read_int(ZP + 0x206, 2) >= 0x020F
    finally:
        m.close()


def test_zero_clears_a_dirty_range_and_keeps_its_neighbours():
    """GuestMemory.zero (the ELF loader's .bss): whole pages are handed back
    with MADV_DONTNEED, partial pages written; both read as zero after."""
    from kvmkit.memory import GuestMemory
    for mem in (GuestMemory(1 << 20), GuestMemory(1 << 20, backing=bytearray(1 << 20))):
        mem.write(0, b"\xab" * (1 << 20))
        mem.zero(0x1234, 0x5000)
        assert mem.read(0x1233, 1) == b"\xab" and mem.read(0x6234, 1) == b"\xab"
        assert mem.read(0x1234, 0x5000) == bytes(0x5000)
        mem.zero(0x8000, 0x10)                     # inside one page: written, nothing released
        assert mem.read(0x7fff, 0x12) == b"\xab" + bytes(0x10) + b"\xab"
        mem.close()
