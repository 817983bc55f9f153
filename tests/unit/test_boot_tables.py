"""e820 map, GDT, identity-map page tables and the MP table."""
from __future__ import annotations

import struct

import pytest

from kvmkit.boot import BootError, layout, mptable, pagetables
from kvmkit.boot.e820 import E820_RAM, E820_RESERVED, e820_map, pack_e820
from kvmkit.memory import GuestMemory
from kvmkit.memory import layout as ram_layout

MIB, GIB = 1 << 20, 1 << 30
RESET_PAGE = (0xFFFF_F000, 0x1000, E820_RESERVED)      # the reset vector's page (kvmkit.chipset)


@pytest.fixture
def mem():
    m = GuestMemory(16 * MIB, backing=bytearray(16 * MIB))
    yield m
    m.close()


# -- e820 ----------------------------------------------------------------------------------
def test_e820_256m():
    assert e820_map(ram_layout(256 * MIB)) == [
        (0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED), (0xF0000, 0x10000, E820_RESERVED),
        (0x100000, 255 * MIB, E820_RAM), RESET_PAGE]


def test_e820_4g_skips_the_pci_hole():
    assert e820_map(ram_layout(4 * GIB)) == [
        (0, 0x9FC00, E820_RAM), (0x9FC00, 0x400, E820_RESERVED), (0xF0000, 0x10000, E820_RESERVED),
        (0x100000, 3 * GIB - MIB, E820_RAM), RESET_PAGE, (4 * GIB, 1 * GIB, E820_RAM)]


def test_e820_exactly_3g_has_no_high_region():
    assert e820_map(ram_layout(3 * GIB))[-2:] == [(0x100000, 3 * GIB - MIB, E820_RAM), RESET_PAGE]


def test_pack_e820_is_20_bytes_per_entry():
    packed = pack_e820(e820_map(ram_layout(4 * GIB)))
    assert len(packed) == 6 * 20
    assert struct.unpack_from("<QQI", packed, 100) == (4 * GIB, GIB, E820_RAM)


# -- GDT -----------------------------------------------------------------------------------
def test_gdt_is_written_with_boot_selectors(mem):
    base, limit = pagetables.write_gdt(mem)
    assert (base, limit) == (0x500, 47)
    qwords = struct.unpack("<6Q", mem.read(0x500, 48))
    assert qwords == (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00808B0000000000, 0)


def test_gdt_descriptors_decode_to_flat_long_mode_segments():
    cs = pagetables.segment(layout.BOOT_CS)
    assert (cs.base, cs.limit, cs.type, cs.s, cs.present, cs.l, cs.db, cs.g) == (0, 0xFFFFFFFF, 0xB, 1, 1, 1, 0, 1)
    ds = pagetables.segment(layout.BOOT_DS)
    assert (ds.base, ds.limit, ds.type, ds.s, ds.present, ds.l, ds.db, ds.g) == (0, 0xFFFFFFFF, 0x3, 1, 1, 0, 1, 1)
    tss = pagetables.segment(layout.BOOT_TSS)
    assert (tss.type, tss.s, tss.present, tss.dpl) == (0xB, 0, 1, 0)


def test_decode_descriptor_base_and_byte_granular_limit():
    d = pagetables.decode_descriptor(0x12_4_5_89_345678_9ABC)   # base 0x12345678, limit 0x59ABC, G=0
    assert (d.base, d.limit, d.g, d.type, d.present) == (0x12345678, 0x59ABC, 0, 0x9, 1)


# -- page tables ---------------------------------------------------------------------------
def _q(mem, addr):
    return mem.read_int(addr, 8)


def test_identity_map_entries(mem):
    mem.write(0x9000, b"\xff" * 0x6000)            # stale tables must be cleared
    assert pagetables.write_identity_map(mem) == 0x9000
    assert _q(mem, 0x9000) == 0xA000 | 0x3
    assert mem.read(0x9008, 4096 - 8) == bytes(4096 - 8)
    assert [_q(mem, 0xA000 + 8 * i) for i in range(4)] == [0xB003, 0xC003, 0xD003, 0xE003]
    assert mem.read(0xA020, 4096 - 32) == bytes(4096 - 32)
    assert _q(mem, 0xB000) == 0x83
    assert _q(mem, 0xB008) == 0x200083
    assert _q(mem, 0xC000) == GIB | 0x83
    assert _q(mem, 0xEFF8) == (4 * GIB - 2 * MIB) | 0x83


def _walk(mem, cr3, va):
    pml4e = _q(mem, cr3 + 8 * ((va >> 39) & 511))
    assert pml4e & 1
    pdpte = _q(mem, (pml4e & ~0xFFF) + 8 * ((va >> 30) & 511))
    assert pdpte & 1 and not pdpte & 0x80
    pde = _q(mem, (pdpte & ~0xFFF) + 8 * ((va >> 21) & 511))
    assert pde & 0x83 == 0x83                     # present, writable, 2 MiB page
    return (pde & ~0x1FFFFF & ((1 << 52) - 1)) | (va & 0x1FFFFF)


@pytest.mark.parametrize("va", [0, 0x7000, 0x1000000, 0x1234567, 0xBFFFFFFF, 0xFEC00000, 0xFFFFFFFF])
def test_identity_map_translates_to_itself(mem, va):
    cr3 = pagetables.write_identity_map(mem)
    assert _walk(mem, cr3, va) == va


# -- MP table ------------------------------------------------------------------------------
def _entries(config: bytes):
    sizes = {0: 20, 1: 8, 2: 8, 3: 8, 4: 8}
    pos, out = 44, []
    while pos < len(config):
        out.append(config[pos:pos + sizes[config[pos]]])
        pos += sizes[config[pos]]
    return out


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_mp_table_checksums_and_counts(vcpus):
    t = mptable.build(vcpus)
    assert mptable.checksum(t.floating) == 0 and mptable.checksum(t.config) == 0
    assert len(t.floating) == 16 and t.floating[:4] == b"_MP_"
    assert struct.unpack_from("<IBB", t.floating, 4) == (0x9FC10, 1, 4)
    sig, length, rev, _ck = struct.unpack_from("<4sHBB", t.config)
    count, lapic = struct.unpack_from("<HI", t.config, 34)
    assert (sig, length, rev, count, lapic) == (b"PCMP", len(t.config), 4, t.entry_count, 0xFEE00000)
    entries = _entries(t.config)
    assert len(entries) == count == vcpus + 2 + 1 + 16 + 2
    cpus = [e for e in entries if e[0] == 0]
    assert [(e[1], e[3]) for e in cpus] == [(i, 0x3 if i == 0 else 0x1) for i in range(vcpus)]
    assert all(struct.unpack_from("<I", e, 8)[0] & 0x200 for e in cpus)     # APIC feature flag
    assert [e[2:8] for e in entries if e[0] == 1] == [b"PCI   ", b"ISA   "]
    ioapics = [e for e in entries if e[0] == 2]
    assert ioapics == [struct.pack("<BBBBI", 2, vcpus, 0x11, 1, 0xFEC00000)]
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(i[4], i[5], i[6]) for i in ints] == [(irq, vcpus, irq) for irq in range(16)]
    assert all(i[1] == 0 and i[3] == 1 for i in ints)                       # INT, from the ISA bus
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(i[1], i[5], i[6]) for i in lints] == [(3, 0xFF, 0), (1, 0xFF, 1)]   # ExtINT LINT0, NMI LINT1
    assert 0x9FC00 + len(t.data) <= 0xA0000


def test_mp_table_is_written_into_the_ebda(mem):
    t = mptable.build(2)
    mptable.write(mem, t)
    assert mem.read(0x9FC00, len(t.data)) == t.data
    assert mem.read_int(0x40E, 2) == 0x9FC0                 # BDA: EBDA segment
    assert mem.read_int(0x413, 2) == 639                    # BDA: base memory in KiB


def test_mp_table_size_limit():
    n = mptable.max_vcpus()
    assert mptable.table_size(n) <= 0x400 < mptable.table_size(n + 1)
    mptable.build(n)
    with pytest.raises(BootError, match=f"at most {n} vCPUs"):
        mptable.build(n + 1)
    with pytest.raises(BootError, match="at least 1 vCPU"):
        mptable.build(0)


def test_corrupting_a_byte_breaks_the_checksum():
    t = mptable.build(2)
    bad = bytearray(t.config)
    bad[50] ^= 1
    assert mptable.checksum(bytes(bad)) != 0


def test_mptable_pci_interrupt_entries():
    t = mptable.build(2, pci_irqs=[(1, 1, 16), (3, 1, 18)])
    assert mptable.checksum(t.floating) == 0 and mptable.checksum(t.config) == 0
    plain = mptable.build(2)
    assert t.entry_count == plain.entry_count + 2
    body = t.config[44:]
    found = []
    i = 0
    while i < len(body):
        kind = body[i]
        size = 20 if kind == 0 else 8
        if kind == 3 and body[i + 4] == mptable.BUS_PCI:
            found.append((body[i + 5], body[i + 7], int.from_bytes(body[i + 2:i + 4], "little")))
        i += size
    assert found == [((1 << 2) | 0, 16, 0x0D), ((3 << 2) | 0, 18, 0x0D)]
