"""bzImage: setup header checks, host decompression of every payload kind, the fallback entry."""
from __future__ import annotations

import glob
import random
import struct
import sys

import pytest

from kvmkit.boot import BootError, bzimage, decompress, elf
from kvmkit.memory import GuestMemory

try:
    from . import test_boot_images as images
except ImportError:
    import test_boot_images as images

MIB = 1 << 20
KINDS = ["gzip", "xz", "lzma", "bzip2", "zstd", "lz4"]


@pytest.fixture
def mem():
    m = GuestMemory(32 * MIB, backing=bytearray(32 * MIB))
    yield m
    m.close()


@pytest.mark.parametrize("kind", KINDS)
def test_payload_is_decompressed_on_the_host_and_the_vmlinux_loaded(mem, kind):
    image = images.make_bzimage(images.compress(kind, images.tiny_vmlinux()))
    img = bzimage.load(mem, image, "bzImage")
    assert img.entry == images.KERNEL_PADDR
    assert (img.start, img.end) == (images.KERNEL_PADDR, images.TINY_END)
    assert mem.read(images.KERNEL_PADDR, len(images.TEXT)) == images.TEXT
    assert mem.read(images.DATA_PADDR, 256) == images.DATA
    assert kind in img.how and "decompressed on the host" in img.how
    assert img.header == image[0x1F1:0x202 + 0x6A]          # the setup header, for the zero page
    assert img.code32_start is None


@pytest.mark.parametrize("kind", KINDS)
def test_identify_by_magic(kind):
    assert decompress.identify(images.compress(kind, b"x" * 100)) == kind
    assert decompress.identify(b"\x89LZO\x00\r\n\x1a\n") == "lzo"
    assert decompress.identify(b"\x00\x00\x00\x00") == "unknown"


def test_lz4_legacy_with_many_blocks_and_a_second_stream():
    data = bytes(random.Random(1).randbytes(300_000)) + bytes(200_000)
    assert decompress.decompress(images.lz4_legacy(data, chunk=50_000), "lz4") == data
    assert decompress.decompress(images.lz4_legacy(data, streams=2), "lz4") == data
    assert decompress.decompress(images.lz4_legacy(data)[:-4], "lz4") == data    # no size trailer


@pytest.mark.parametrize("kind", KINDS)
def test_truncated_payload_is_corrupt(kind):
    payload = images.compress(kind, bytes(random.Random(2).randbytes(100_000)))
    with pytest.raises(decompress.CorruptPayload):
        decompress.decompress(payload[:len(payload) // 2], kind)


def test_corrupt_payload_is_a_boot_error_naming_the_file(mem):
    payload = bytearray(images.compress("gzip", images.tiny_vmlinux()))
    payload[20:40] = bytes(20)
    with pytest.raises(BootError, match=r"/k/bzImage: the gzip payload is corrupt"):
        bzimage.load(mem, images.make_bzimage(bytes(payload)), "/k/bzImage")


def test_old_boot_protocol_is_rejected(mem):
    image = images.make_bzimage(images.compress("gzip", images.tiny_vmlinux()), version=0x0205)
    with pytest.raises(BootError, match=r"boot protocol 2.05 is too old.*2.06"):
        bzimage.load(mem, image, "bzImage")


def test_missing_hdrs_is_rejected(mem):
    image = bytearray(images.make_bzimage(images.compress("gzip", images.tiny_vmlinux())))
    image[0x202:0x206] = b"\0\0\0\0"
    with pytest.raises(BootError, match="HdrS"):
        bzimage.load(mem, bytes(image), "bzImage")


def test_header_fields_are_parsed():
    image = images.make_bzimage(b"\x1f\x8bxxxx", setup_sects=0, pref=0x2000000, init_size=0x1234000,
                                cmdline_size=255, initrd_addr_max=0x37FFFFFF, xloadflags=0x1f)
    hdr = bzimage.parse_header(image, "bzImage")
    assert hdr.setup_sects == 4 and hdr.kernel_offset == 5 * 512        # 0 means 4
    assert (hdr.version, hdr.pref_address, hdr.init_size) == (0x020F, 0x2000000, 0x1234000)
    assert (hdr.cmdline_size, hdr.initrd_addr_max, hdr.xloadflags) == (255, 0x37FFFFFF, 0x1f)
    assert (hdr.payload_offset, hdr.payload_length) == (len(images.PM_HEAD), 6)
    assert hdr.relocatable_kernel and hdr.kernel_alignment == 0x200000
    assert hdr.header_end == 0x26C


@pytest.mark.parametrize("payload", [b"\x89LZO\x00\r\n\x1a\n" + bytes(64), b"\x42" * 64,
                                     images.compress("gzip", b"not an ELF at all" * 10)],
                         ids=["lzo", "unknown", "not-elf"])
def test_unusable_payload_falls_back_to_the_bzimage_64bit_entry(mem, payload):
    image = images.make_bzimage(payload, pref=0x1000000, init_size=0x800000)
    img = bzimage.load(mem, image, "bzImage")
    pm = images.protected_mode_part(image)
    assert img.entry == 0x1000000 + 0x200
    assert mem.read(img.entry + 2, 9) == b"STARTUP64"
    assert mem.read(0x1000000, len(pm)) == pm
    assert (img.start, img.end) == (0x1000000, 0x1000000 + 0x800000)
    assert img.code32_start == 0x1000000
    assert "own decompressor" in img.how


def test_missing_package_falls_back(mem, monkeypatch):
    built = {kind: images.make_bzimage(images.compress(kind, images.tiny_vmlinux())) for kind in ("lz4", "zstd")}
    monkeypatch.setitem(sys.modules, "lz4.block", None)
    monkeypatch.setitem(sys.modules, "zstandard", None)
    for kind, image in built.items():
        img = bzimage.load(mem, image, "bzImage")
        assert img.entry == 0x1000200 and "package" in img.how


def test_fallback_loads_a_non_relocatable_kernel_at_1mib(mem):
    img = bzimage.load(mem, images.make_bzimage(b"\x42" * 64, relocatable=0), "bzImage")
    assert (img.start, img.entry, img.code32_start) == (0x100000, 0x100200, 0x100000)


def test_fallback_aligns_the_preferred_address(mem):
    img = bzimage.load(mem, images.make_bzimage(b"\x42" * 64, pref=0x1100000, align=0x200000), "bzImage")
    assert img.start == 0x1200000


def test_fallback_needs_the_64bit_entry(mem):
    with pytest.raises(BootError, match="XLF_KERNEL_64"):
        bzimage.load(mem, images.make_bzimage(b"\x42" * 64, xloadflags=0x2), "bzImage")
    with pytest.raises(BootError, match="XLF_KERNEL_64"):          # 2.06 has no payload and no xloadflags
        bzimage.load(mem, images.make_bzimage(b"\x42" * 64, version=0x0206), "bzImage")


def test_fallback_checks_init_size_fits_in_ram(mem):
    with pytest.raises(BootError, match=r"memory too small for the kernel: needs 48 MiB, machine has 32"):
        bzimage.load(mem, images.make_bzimage(b"\x42" * 64, init_size=32 * MIB), "bzImage")


def test_truncated_and_garbage_files_raise_only_boot_error(mem):
    """Every prefix, byte flip and random file either loads or raises BootError."""
    good = images.make_bzimage(images.compress("gzip", images.tiny_vmlinux()))
    rng = random.Random(3)
    cases = [good[:n] for n in range(0, len(good), 97)]
    for _ in range(150):
        bad = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            bad[rng.randrange(0x1F0, len(bad))] = rng.randrange(256)
        cases.append(bytes(bad))
    cases += [rng.randbytes(rng.randint(0, 4000)) for _ in range(30)]
    cases += [good[:0x1FE] + b"\x55\xaa" + rng.randbytes(600) for _ in range(30)]
    outcomes = set()
    for case in cases:
        try:
            bzimage.load(mem, case, "bzImage") if bzimage.is_bzimage(case) else elf.load(mem, case, "vmlinux")
            outcomes.add("ok")
        except BootError:
            outcomes.add("error")
    assert outcomes == {"ok", "error"}


DEBIAN = sorted(glob.glob("/boot/vmlinuz-*"))


@pytest.mark.skipif(not DEBIAN, reason="no /boot/vmlinuz-* on this machine")
def test_debian_kernel_payload_decompresses_to_a_vmlinux_entered_at_16mib():
    data = open(DEBIAN[-1], "rb").read()
    hdr = bzimage.parse_header(data, DEBIAN[-1])
    start = hdr.kernel_offset + hdr.payload_offset
    payload = data[start:start + hdr.payload_length]
    kind = decompress.identify(payload)
    vmlinux = decompress.decompress(payload, kind)
    entry, segments = elf.parse(vmlinux, "vmlinux")
    assert entry == 0x1000000
    assert struct.unpack("<I", payload[-4:])[0] == len(vmlinux)       # the build's size trailer
    assert min(s.paddr for s in segments) == 0x1000000
