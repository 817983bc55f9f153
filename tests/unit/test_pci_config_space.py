import pytest

from kvmkit.pci import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, ConfigSpace, ConfigSpaceError
from kvmkit.pci.config_space import (COMMAND_WRITABLE, STATUS_CAPABILITIES, STATUS_INTERRUPT,
                                     STATUS_RECEIVED_MASTER_ABORT, STATUS_SIGNALED_TARGET_ABORT)


def make(**kw):
    args = dict(vendor_id=0x1AF4, device_id=0x1042, class_code=0x010000, revision=1,
                subsystem_vendor_id=0x1AF4, subsystem_id=0x0002, interrupt_pin=1)
    args.update(kw)
    return ConfigSpace(**args)


def test_header_values():
    c = make()
    assert c.read(0x00, 2) == 0x1AF4
    assert c.read(0x02, 2) == 0x1042
    assert c.read(0x00, 4) == 0x1042_1AF4
    assert c.read(0x08, 4) == 0x0100_0001            # class code above revision 1
    assert c.read(0x0E, 1) == 0x00                   # header type 0, single function
    assert c.read(0x2C, 4) == 0x0002_1AF4
    assert c.read(0x3D, 1) == 1
    assert c.read(0x04, 2) == 0 and c.read(0x06, 2) == 0
    assert c.read(0x34, 1) == 0                      # no capabilities yet
    assert c.read(0x30, 4) == 0                      # no expansion ROM
    assert (c.vendor_id, c.device_id, c.class_code) == (0x1AF4, 0x1042, 0x010000)


def test_unaligned_reads_are_bytewise():
    c = make()
    assert c.read(0x01, 2) == 0x421A
    assert c.read(0x03, 4) == 0x0000_0010            # 0x10 (device id high byte), command, status
    assert c.read(0x0B, 2) == 0x0001                 # base class 0x01, cache line 0
    assert c.read(0xFC, 4) == 0                      # the last dword is inside


@pytest.mark.parametrize("offset,size", [(0xFF, 2), (0xFD, 4), (0x100, 1), (-1, 1)])
def test_out_of_range_reads_are_all_ones_and_writes_ignored(offset, size):
    c = make()
    before = bytes(c.read(i, 1) for i in range(256))
    assert c.read(offset, size) == (1 << (8 * size)) - 1
    c.write(offset, size, 0)
    assert bytes(c.read(i, 1) for i in range(256)) == before


def test_bad_access_size_is_a_programming_error():
    with pytest.raises(ValueError):
        make().read(0, 3)
    with pytest.raises(ValueError):
        make().write(0, 8, 0)


@pytest.mark.parametrize("kw", [dict(vendor_id=0xFFFF), dict(vendor_id=0x10000),
                                dict(class_code=1 << 24), dict(revision=256), dict(interrupt_pin=5),
                                dict(subsystem_id=-1)])
def test_constructor_checks_field_widths(kw):
    with pytest.raises(ConfigSpaceError):
        make(**kw)


def test_read_only_bits_stay():
    c = make()
    for offset in (0x00, 0x08, 0x0C, 0x2C, 0x30, 0x34, 0x3C):
        before = c.read(offset, 4)
        c.write(offset, 4, 0xFFFF_FFFF)
        after = c.read(offset, 4)
        if offset == 0x0C:
            assert after == before | 0xFF            # only the cache line size sticks
        elif offset == 0x3C:
            assert after == 0x0000_01FF              # line writable, pin 1 read-only
        else:
            assert after == before
    c.write(0x00, 2, 0)
    assert c.read(0x00, 2) == 0x1AF4


def test_command_writable_bits_only():
    c = make()
    c.write(0x04, 2, 0xFFFF)
    assert c.command == COMMAND_WRITABLE == 0x0407
    assert c.io_enabled and c.memory_enabled and c.bus_master and c.intx_disabled
    c.write(0x05, 1, 0x00)                           # byte write to the high half clears INTx disable
    assert c.command == 0x0007 and not c.intx_disabled


def test_interrupt_line_is_read_write_and_pin_read_only():
    c = make()
    c.write(0x3C, 1, 11)
    c.write(0x3D, 1, 4)
    assert c.interrupt_line == 11 and c.interrupt_pin == 1
    assert c.read(0x3C, 2) == 0x010B


def test_status_error_bits_are_write_one_to_clear():
    c = make()
    c.raise_status(STATUS_RECEIVED_MASTER_ABORT | STATUS_SIGNALED_TARGET_ABORT)
    c.set_interrupt_status(True)
    assert c.status == STATUS_RECEIVED_MASTER_ABORT | STATUS_SIGNALED_TARGET_ABORT | STATUS_INTERRUPT
    c.write(0x06, 2, 0)                              # writing 0s changes nothing
    assert c.status & STATUS_RECEIVED_MASTER_ABORT
    c.write(0x06, 2, STATUS_RECEIVED_MASTER_ABORT | STATUS_INTERRUPT)
    assert c.status == STATUS_SIGNALED_TARGET_ABORT | STATUS_INTERRUPT   # bit 3 is read-only
    c.write(0x04, 4, (0xFFFF << 16) | 0x0002)        # command + status in one dword
    assert c.status == STATUS_INTERRUPT and c.command == 0x0002
    c.set_interrupt_status(False)
    assert c.status == 0
    with pytest.raises(ConfigSpaceError):
        c.raise_status(STATUS_CAPABILITIES)


def test_capabilities_bit_is_read_only():
    c = make()
    c.add_capability(PCI_CAP_ID_VNDR, b"\x00\x00")
    c.write(0x06, 2, 0xFFFF)
    assert c.status == STATUS_CAPABILITIES


# -- BARs -----------------------------------------------------------------------------------------
def size_bar(c, offset):
    original = c.read(offset, 4)
    c.write(offset, 4, 0xFFFF_FFFF)
    sized = c.read(offset, 4)
    c.write(offset, 4, original)
    return sized


def test_mem32_bar_sizing():
    c = make()
    c.add_bar(1, 0x4000, "mem32")
    assert c.read(0x14, 4) == 0
    assert size_bar(c, 0x14) == 0xFFFF_C000
    assert c.read(0x14, 4) == 0


def test_mem32_prefetchable_flag_is_read_only():
    c = make()
    c.add_bar(0, 0x1000, "mem32", prefetchable=True)
    assert c.read(0x10, 4) == 0x8
    assert size_bar(c, 0x10) == 0xFFFF_F008
    c.write(0x10, 4, 0)
    assert c.read(0x10, 4) == 0x8


def test_mem64_bar_sizing_both_halves():
    c = make()
    c.add_bar(2, 0x10_0000, "mem64", prefetchable=True)
    assert c.read(0x18, 4) == 0xC                    # 64-bit, prefetchable
    assert size_bar(c, 0x18) == 0xFFF0_000C
    assert size_bar(c, 0x1C) == 0xFFFF_FFFF
    c.write(0x18, 4, 0xFFFF_FFFF)
    c.write(0x1C, 4, 0xFFFF_FFFF)
    size = ((c.read(0x1C, 4) << 32) | (c.read(0x18, 4) & ~0xF)) ^ ((1 << 64) - 1)
    assert size + 1 == 0x10_0000


def test_mem64_bar_bigger_than_4g():
    c = make()
    c.add_bar(0, 1 << 33, "mem64")
    assert size_bar(c, 0x10) == 0x0000_0004          # no writable address bits in the low half
    assert size_bar(c, 0x14) == 0xFFFF_FFFE


def test_io_bar_sizing():
    c = make()
    c.add_bar(5, 0x40, "io")
    assert c.read(0x24, 4) == 0x1
    assert size_bar(c, 0x24) == 0x0000_FFC1          # 16-bit port space, bit 0 says I/O
    c.write(0x24, 4, 0xC041)
    assert c.bar_address(5) == 0xC040 and c.read(0x24, 4) == 0xC041


def test_bar_byte_writes():
    c = make()
    c.add_bar(0, 0x1000, "mem32")
    c.write(0x13, 1, 0xFE)
    c.write(0x11, 1, 0xDF)
    assert c.bar_address(0) == 0xFE00_D000


def test_unused_bar_slots_read_zero_and_ignore_writes():
    c = make()
    c.add_bar(0, 0x1000, "mem64")
    for offset in (0x18, 0x1C, 0x20, 0x24):
        assert size_bar(c, offset) == 0


@pytest.mark.parametrize("index,size,kind", [
    (5, 0x1000, "mem64"), (6, 0x1000, "mem32"), (-1, 0x1000, "mem32"),
    (0, 0x1800, "mem32"), (0, 8, "mem32"), (0, 2, "io"), (0, 512, "io"), (0, 0x1000, "rom")])
def test_bad_bars_are_refused(index, size, kind):
    with pytest.raises(ConfigSpaceError):
        make().add_bar(index, size, kind)


def test_bar_slots_cannot_overlap():
    c = make()
    c.add_bar(0, 0x1000, "mem64")
    with pytest.raises(ConfigSpaceError, match="slot 1"):
        c.add_bar(1, 0x1000, "mem32")
    c.add_bar(2, 0x1000, "mem32")
    with pytest.raises(ConfigSpaceError):
        c.add_bar(1, 0x1000, "mem64")
    with pytest.raises(ConfigSpaceError):
        make().add_bar(0, 0x100, "io", prefetchable=True)


def test_set_bar_address_and_bar_snapshots():
    c = make()
    c.add_bar(0, 0x4000, "mem64", prefetchable=True)
    c.add_bar(2, 0x1000, "mem32")
    c.add_bar(3, 0x20, "io")
    c.set_bar_address(0, 0x1_2345_C000)
    c.set_bar_address(2, 0xC000_1000)
    c.set_bar_address(3, 0xC020)
    assert c.read(0x10, 4) == 0x2345_C00C and c.read(0x14, 4) == 0x1
    assert [(b.index, b.kind, b.size, b.prefetchable, b.address) for b in c.bars()] == [
        (0, "mem64", 0x4000, True, 0x1_2345_C000), (2, "mem32", 0x1000, False, 0xC000_1000),
        (3, "io", 0x20, False, 0xC020)]
    for index, address in ((0, 0x1_2345_E000), (2, 1 << 32), (3, 0x1_0000), (2, 0xC000_1800)):
        with pytest.raises(ConfigSpaceError):
            c.set_bar_address(index, address)
    with pytest.raises(ConfigSpaceError):
        c.bar_address(1)


def test_decoded_bars_follow_the_command_register():
    c = make()
    c.add_bar(0, 0x1000, "mem32")
    c.add_bar(1, 0x20, "io")
    assert c.decoded_bars() == []
    c.write(0x04, 2, 0x2)
    assert [b.index for b in c.decoded_bars()] == [0]
    c.write(0x04, 2, 0x1)
    assert [b.index for b in c.decoded_bars()] == [1]
    c.write(0x04, 2, 0x3)
    assert [b.index for b in c.decoded_bars()] == [0, 1]


def test_bar_moves_and_command_changes_call_on_change():
    events = []
    c = make(on_change=events.append)
    c.add_bar(0, 0x1000, "mem64")
    c.add_bar(2, 0x100, "io")
    c.set_bar_address(0, 0xC000_0000)
    assert events == [("bar", 0, 0, 0xC000_0000)]
    events.clear()
    c.write(0x10, 4, 0xD000_0000)
    c.write(0x14, 4, 0x1)
    assert events == [("bar", 0, 0xC000_0000, 0xD000_0000), ("bar", 0, 0xD000_0000, 0x1_D000_0000)]
    events.clear()
    c.write(0x10, 4, 0xD000_0FFF)                    # only read-only bits differ: no move
    c.write(0x04, 2, 0x0002)
    c.write(0x04, 2, 0x0002)                         # unchanged: no event
    c.write(0x04, 2, 0x0003)
    c.write(0x18, 2, 0xC100)
    assert events == [("command", 0, 2), ("command", 2, 3), ("bar", 2, 0, 0xC100)]
    events.clear()
    c.set_bar_address(2, 0xC100)                     # same address: nothing
    c.write(0x06, 2, 0xFFFF)                         # status only
    assert events == []


# -- capabilities ---------------------------------------------------------------------------------
def walk(c):
    out, seen = [], set()
    pointer = c.read(0x34, 1) & ~3
    while pointer:
        assert pointer not in seen and pointer >= 0x40 and pointer % 4 == 0
        seen.add(pointer)
        out.append((pointer, c.read(pointer, 1)))
        pointer = c.read(pointer + 1, 1) & ~3
    return out


def test_capability_chain_with_several_capabilities():
    c = make()
    a = c.add_capability(PCI_CAP_ID_VNDR, bytes([14, 1]) + bytes(12))    # 16 bytes in all
    b = c.add_capability(PCI_CAP_ID_VNDR, bytes([3, 2, 0]))              # 5 bytes: next is aligned
    m = c.add_capability(PCI_CAP_ID_MSIX, bytes(10))
    d = c.add_capability(0x05, bytes(1))
    assert (a, b, m, d) == (0x40, 0x50, 0x58, 0x64)
    assert c.status & STATUS_CAPABILITIES
    assert walk(c) == [(0x40, 0x09), (0x50, 0x09), (0x58, 0x11), (0x64, 0x05)]
    assert c.capabilities() == walk(c)
    assert c.read(0x50, 4) == 0x0203_5809            # id, next, body
    assert c.read(0x65, 1) == 0                      # the last one ends the list


def test_capability_list_fills_up():
    c = make()
    c.add_capability(PCI_CAP_ID_VNDR, bytes(0xBE))    # 0x40-0xFF exactly
    assert c.read(0xFC, 4) == 0
    with pytest.raises(ConfigSpaceError, match="does not fit"):
        c.add_capability(PCI_CAP_ID_VNDR, b"")
    with pytest.raises(ConfigSpaceError, match="write mask"):
        make().add_capability(PCI_CAP_ID_VNDR, b"ab", b"\xff")


def test_capability_writable_masks_and_callbacks():
    seen, own = [], []
    c = make(on_capability_write=lambda *a: seen.append(a))
    ro = c.add_capability(PCI_CAP_ID_VNDR, b"\x11\x22")
    rw = c.add_capability(PCI_CAP_ID_VNDR, b"\x00\x00\x00\x00", b"\xff\x0f\x00\xf0",
                          on_write=lambda *a: own.append(a))
    c.write(ro, 4, 0xFFFF_FFFF)
    assert c.read(ro, 4) == 0x2211_4409              # id/next header and body unchanged
    assert seen == [(ro, 0, 2, 0xFFFF)]
    seen.clear()
    c.write(rw + 2, 4, 0xFFFF_FFFF)
    assert c.read(rw + 2, 4) == 0xF000_0FFF
    assert own == [(0, 4, 0xFFFF_FFFF)] and seen == [(rw, 0, 4, 0xFFFF_FFFF)]
    own.clear()
    seen.clear()
    c.write(rw + 5, 1, 0x0F)
    assert c.read(rw + 5, 1) == 0x00
    c.write(rw, 4, 0x1234_5678)                      # header + first two body bytes
    assert own == [(3, 1, 0x0F), (0, 2, 0x1234)]
    assert c.read(rw, 4) == 0x0234_0009 and seen[-1] == (rw, 0, 2, 0x1234)


def test_capability_write_spanning_two_bodies():
    calls = []
    c = make(on_capability_write=lambda *a: calls.append(a))
    a = c.add_capability(PCI_CAP_ID_VNDR, b"\x00\x00", b"\xff\xff")
    b = c.add_capability(PCI_CAP_ID_VNDR, b"\x00\x00", b"\xff\xff")
    c.write(a + 2, 4, 0xAABB_CCDD)                   # a's body then b's header
    assert calls == [(a, 0, 2, 0xCCDD)] and c.read(b, 2) == 0x0009
    calls.clear()
    c.write(b + 3, 1, 0x77)
    assert calls == [(b, 1, 1, 0x77)]


def test_capability_on_read_can_refresh_the_body():
    counter = iter(range(1, 100))
    c = make()
    cap = c.add_capability(PCI_CAP_ID_VNDR, bytes(4),
                           on_read=lambda off, size: c.poke(cap + 2 + off, bytes([next(counter)]) * size))
    assert c.read(cap + 2, 1) == 0x01
    assert c.read(cap + 4, 2) == 0x0202
    assert c.read(cap, 2) == 0x0009                  # header only: no callback
    with pytest.raises(ConfigSpaceError):
        c.poke(0xFF, b"ab")
