import pytest

from kvmkit.boot.layout import IOAPIC_ADDR
from kvmkit.memory import PCI_HOLE_START
from kvmkit.pci import AllocationError, ConfigSpace, IoAllocator, MmioAllocator


def test_default_window_is_the_pci_hole_below_the_ioapic():
    a = MmioAllocator()
    assert (a.start, a.end) == (PCI_HOLE_START, IOAPIC_ADDR) == (0xC000_0000, 0xFEC0_0000)
    io = IoAllocator()
    assert (io.start, io.end) == (0xC000, 0x10000)


def test_ranges_are_naturally_aligned_and_disjoint():
    a = MmioAllocator()
    sizes = [0x1000, 0x4000, 0x1000, 0x10_0000, 0x2000, 0x1000, 0x400_0000]
    got = [(a.allocate(s), s) for s in sizes]
    for base, size in got:
        assert base % size == 0 and a.start <= base and base + size <= a.end
    spans = sorted(got)
    for (b1, s1), (b2, _) in zip(spans, spans[1:]):
        assert b1 + s1 <= b2
    assert a.allocations() == spans
    assert a.used == sum(sizes)


def test_alignment_padding_is_reused():
    a = MmioAllocator()
    assert a.allocate(0x1000) == 0xC000_0000
    assert a.allocate(0x10_0000) == 0xC010_0000       # skips to the next 1 MiB boundary
    assert a.allocate(0x2000) == 0xC000_2000          # fills the gap it left
    assert a.allocate(0x1000) == 0xC000_1000


def test_small_memory_ranges_take_a_whole_page():
    a = MmioAllocator()
    assert a.allocate(0x10) == 0xC000_0000
    assert a.allocate(0x100) == 0xC000_1000
    assert a.allocations() == [(0xC000_0000, 0x1000), (0xC000_1000, 0x1000)]


@pytest.mark.parametrize("size", [0, -0x1000, 0x3000, 0x1800])
def test_sizes_must_be_powers_of_two(size):
    with pytest.raises(AllocationError, match="power of two"):
        MmioAllocator().allocate(size)


def test_exhaustion_is_a_clear_error():
    a = MmioAllocator(0xC000_0000, 0xC001_0000)
    for _ in range(16):
        a.allocate(0x1000)
    with pytest.raises(AllocationError, match=r"MMIO window 0xc0000000-0xc000ffff has no free 0x1000-byte"):
        a.allocate(0x1000)


def test_a_range_bigger_than_what_aligned_space_remains_fails():
    a = MmioAllocator(0xC000_0000, 0xC003_0000)
    a.allocate(0x1000)                                # 0xC0000000
    with pytest.raises(AllocationError):
        a.allocate(0x2_0000)                          # would need 0xC0020000-0xC003FFFF
    assert a.allocate(0x1_0000) == 0xC001_0000


def test_whole_default_window_capacity():
    a = MmioAllocator()
    assert a.allocate(0x2000_0000) == 0xC000_0000    # 512 MiB
    assert a.allocate(0x1000_0000) == 0xE000_0000    # 256 MiB
    with pytest.raises(AllocationError):
        a.allocate(0x1000_0000)                       # 0xF0000000 + 256 MiB passes the IOAPIC
    assert a.allocate(0x800_0000) == 0xF000_0000


def test_io_allocator_granule_and_alignment():
    io = IoAllocator()
    assert io.allocate(1) == 0xC000
    assert io.allocate(0x20) == 0xC020
    assert io.allocate(4) == 0xC004
    with pytest.raises(AllocationError, match="I/O port window"):
        IoAllocator(0xC000, 0xC010).allocate(0x20)


def test_bad_window():
    with pytest.raises(ValueError):
        MmioAllocator(0xD000_0000, 0xC000_0000)


def make_function():
    c = ConfigSpace(0x1AF4, 0x1042, 0x010000)
    c.add_bar(0, 0x1000, "mem32")
    c.add_bar(1, 0x10_0000, "mem64", prefetchable=True)
    c.add_bar(3, 0x4000, "mem32")
    return c


def test_assign_bars_gives_every_bar_an_aligned_address():
    events = []
    c = make_function()
    c.on_change = events.append
    a = MmioAllocator()
    assigned = a.assign_bars(c)
    assert assigned == {1: 0xC000_0000, 3: 0xC010_0000, 0: 0xC010_4000}
    assert {b.index: b.address for b in c.bars()} == assigned
    assert c.read(0x14, 4) == 0xC000_000C and c.read(0x18, 4) == 0
    assert sorted(e[1] for e in events) == [0, 1, 3]
    second = make_function()
    again = a.assign_bars(second)
    assert not set(again.values()) & set(assigned.values())


def test_assign_bars_with_io():
    c = ConfigSpace(0x1AF4, 0x1000, 0x020000)
    c.add_bar(0, 0x20, "io")
    c.add_bar(1, 0x1000, "mem32")
    with pytest.raises(AllocationError, match="IoAllocator"):
        MmioAllocator().assign_bars(c)
    assert c.bar_address(0) == 0 and c.bar_address(1) == 0   # nothing half-done
    assert MmioAllocator().assign_bars(c, IoAllocator()) == {0: 0xC000, 1: 0xC000_0000}
    assert c.read(0x10, 4) == 0xC001
