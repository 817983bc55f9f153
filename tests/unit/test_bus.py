import threading

import pytest

from kvmkit.bus import Bus, BusConflict, DeviceFault


class Recorder:
    def __init__(self, value=0x12345678):
        self.value = value
        self.calls = []

    def read(self, offset, size):
        self.calls.append(("r", offset, size))
        return self.value

    def write(self, offset, size, value):
        self.calls.append(("w", offset, size, value))


def make_bus(miss=None):
    return Bus("pio", miss)


def test_dispatch_uses_offsets_within_the_range():
    bus, dev = make_bus(), Recorder()
    bus.add(0x3F8, 8, dev, threading.RLock(), "uart")
    bus.write(0x3FB, 1, 0x83)
    assert bus.read(0x3F8, 1) == 0x78          # truncated to the access size
    assert dev.calls == [("w", 3, 1, 0x83), ("r", 0, 1)]


def test_lookup_between_ranges_misses():
    bus = make_bus()
    a, b = Recorder(1), Recorder(2)
    bus.add(0x70, 2, a, threading.RLock(), "rtc")
    bus.add(0x60, 1, b, threading.RLock(), "kbd")
    assert bus.find(0x71).owner == "rtc"
    assert bus.find(0x60).owner == "kbd"
    assert bus.find(0x61) is None and bus.find(0x72) is None and bus.find(0x5F) is None


@pytest.mark.parametrize("base,size", [(0x3F8, 1), (0x3F0, 9), (0x3FF, 4), (0x3F0, 0x20)])
def test_overlaps_are_refused_naming_both_devices(base, size):
    bus = make_bus()
    bus.add(0x3F8, 8, Recorder(), threading.RLock(), "serial8250.0")
    with pytest.raises(BusConflict, match=r"serial8250\.1.*overlaps serial8250\.0"):
        bus.add(base, size, Recorder(), threading.RLock(), "serial8250.1")


def test_adjacent_ranges_are_fine():
    bus = make_bus()
    bus.add(0x3F8, 8, Recorder(), threading.RLock(), "a")
    bus.add(0x400, 8, Recorder(), threading.RLock(), "b")
    bus.add(0x3F0, 8, Recorder(), threading.RLock(), "c")
    assert [r.owner for r in bus.ranges()] == ["c", "a", "b"]


def test_unclaimed_reads_are_all_ones_and_logged_once(caplog):
    bus = make_bus()
    with caplog.at_level("INFO", logger="kvmkit.bus"):
        assert bus.read(0x80, 1) == 0xFF
        assert bus.read(0x80, 2) == 0xFFFF
        bus.write(0x80, 1, 0)
        assert bus.read(0xCFC, 4) == 0xFFFFFFFF
    lines = [r for r in caplog.records if "unclaimed" in r.getMessage()]
    assert len(lines) == 2


def test_access_straddling_the_end_of_a_range_is_unclaimed():
    bus, dev = make_bus(), Recorder()
    bus.add(0x70, 2, dev, threading.RLock(), "rtc")
    assert bus.read(0x71, 2) == 0xFFFF
    assert dev.calls == []


def test_miss_hook_can_claim():
    seen = []

    def miss(space, addr, size, is_write, value):
        seen.append((space, addr, size, is_write, value))
        return 0x42 if addr == 0x92 else None

    bus = make_bus(miss)
    assert bus.read(0x92, 1) == 0x42
    assert bus.read(0x93, 1) == 0xFF
    bus.write(0x92, 1, 7)
    assert seen[0] == ("pio", 0x92, 1, False, 0)
    assert seen[-1] == ("pio", 0x92, 1, True, 7)


def test_device_exceptions_are_wrapped_with_the_device_name():
    class Broken:
        def read(self, offset, size):
            raise RuntimeError("boom")

        def write(self, offset, size, value):
            raise RuntimeError("boom")

    bus = make_bus()
    bus.add(0x10, 1, Broken(), threading.RLock(), "broken.0")
    with pytest.raises(DeviceFault, match="broken.0.*boom"):
        bus.read(0x10, 1)


def test_device_lock_is_held_during_the_call():
    lock = threading.RLock()

    class Checker:
        def read(self, offset, size):
            assert lock._is_owned()
            return 0

        def write(self, offset, size, value):
            assert lock._is_owned()

    bus = make_bus()
    bus.add(0x10, 1, Checker(), lock, "c")
    bus.read(0x10, 1)
    bus.write(0x10, 1, 0)
    assert not lock._is_owned()


def test_remove_then_add_elsewhere():
    bus, dev = make_bus(), Recorder()
    bus.add(0xC000_0000, 0x8000, dev, threading.RLock(), "virtio-blk.0")
    with pytest.raises(KeyError):
        bus.remove(0xC000_0000, "someone-else")
    bus.remove(0xC000_0000, "virtio-blk.0")
    assert bus.find(0xC000_0000) is None
    bus.add(0xD000_0000, 0x8000, dev, threading.RLock(), "virtio-blk.0")
    assert bus.find(0xD000_1000).owner == "virtio-blk.0"


def test_cached_lookups_follow_a_moved_range():
    """Bus caches address -> range per table; a change starts a new table, so
    an address already looked up reaches the range's new owner, and an access
    that straddles a cached range's end is still unclaimed."""
    bus, old, new = make_bus(), Recorder(1), Recorder(2)
    lock = threading.RLock()
    bus.add(0xC000, 0x40, old, lock, "bar")
    assert bus.read(0xC010, 4) == 1 and bus.read(0xC010, 4) == 1      # second one from the cache
    assert bus.read(0xC03E, 4) == 0xFFFFFFFF                           # straddles the end
    bus.remove(0xC000, "bar")
    assert bus.read(0xC010, 4) == 0xFFFFFFFF
    bus.add(0xC000, 0x40, new, lock, "bar")
    assert bus.read(0xC010, 4) == 2
    assert old.calls == [("r", 0x10, 4)] * 2


def test_a_guest_touching_ever_new_addresses_cannot_grow_the_vmm(caplog):
    """500k distinct unclaimed addresses: memory and log lines stay bounded
    (the old bus remembered every address: ~40 MiB and 500k log lines)."""
    import tracemalloc

    bus = Bus("mmio")
    caplog.set_level("INFO", logger="kvmkit.bus")
    for i in range(400_000):
        assert bus.read(0xC000_0000 + 4 * i, 4) == 0xFFFFFFFF
    tracemalloc.start()                     # the last 100k (traced: slower)
    try:
        base, _ = tracemalloc.get_traced_memory()
        for i in range(400_000, 500_000):
            bus.write(0xC000_0000 + 4 * i, 4, i)
        now, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(bus._missed) <= 4096
    assert now - base < 64 << 10, f"bus grew by {now - base} bytes over 100k misses"
    lines = [r.getMessage() for r in caplog.records if r.name == "kvmkit.bus"]
    assert 0 < len(lines) <= 64 + 5          # the first 64, then one a minute with a count
    assert any("further ones: one line per" in line for line in lines)
