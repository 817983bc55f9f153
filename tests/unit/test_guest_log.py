"""GuestLog: the first N lines of a kind, then one line per interval with a count."""
import logging

from kvmkit.guest_log import GuestLog
from kvmkit.plugin_api import GuestLog as ReExported


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def messages(caplog):
    return [r.getMessage() for r in caplog.records if r.name == "test.guest"]


def test_first_burst_then_one_counted_line_per_interval(caplog):
    clock = Clock()
    log = GuestLog(logging.getLogger("test.guest"), burst=3, interval=10, clock=clock)
    caplog.set_level("INFO", logger="test.guest")
    logged = [log.warning("bad-ring", "bad ring %d", i) for i in range(10_000)]
    assert logged[:3] == [True] * 3 and not any(logged[3:])
    lines = messages(caplog)
    assert lines[:2] == ["bad ring 0", "bad ring 1"]
    assert lines[2].startswith("bad ring 2 (further ones: one line per 10 s")
    assert len(lines) == 3 and log.suppressed() == 9_997
    clock.t += 10
    assert log.warning("bad-ring", "bad ring %d", 10_000)
    assert messages(caplog)[-1] == "bad ring 10000 (and 9997 more like it not logged since the last)"
    assert not log.warning("bad-ring", "bad ring %d", 10_001)       # the next interval again
    assert log.info("other", "another kind")                          # kinds have their own budgets


def test_unbounded_keys_share_one_budget(caplog):
    log = GuestLog("test.guest", burst=2, interval=1e9)
    caplog.set_level("INFO", logger="test.guest")
    for i in range(100_000):
        log.info(("addr", i), "touched %d", i)
    assert len(log._kinds) <= 257
    assert len(messages(caplog)) <= 2 * 256 + 2


def test_plugins_reach_it_through_the_plugin_api():
    assert ReExported is GuestLog


# -- the places a guest makes the core log: each is rate-limited -------------------------
GUEST_REPEATS = 2_000


def test_acpi_sleep_requests_do_not_flood_the_log(caplog):
    from kvmkit.acpi import platform
    p = platform.AcpiPlatform(lambda *a: None)
    caplog.set_level("INFO", logger="kvmkit.acpi")
    for _ in range(GUEST_REPEATS):
        p.write(platform.PM1_CNT, 2, (3 << 10) | platform.SLP_EN)           # S3: not offered
        p.write(platform.OSPM, 1, 2)                                          # EVENT_TAKEN
    assert p.events_taken == GUEST_REPEATS
    assert 2 <= len([r for r in caplog.records if r.name == "kvmkit.acpi"]) <= 2 * 11


def test_bar_conflicts_do_not_flood_the_log(caplog):
    import threading
    import types

    from kvmkit.bus import Bus
    from kvmkit.pci import ConfigSpace
    from kvmkit.pci_mapping import BarMapper
    machine = types.SimpleNamespace(mmio=Bus("mmio"), pio=Bus("pio"))
    machine.mmio.add(0xE000_0000, 0x1000, object(), threading.RLock(), "other")
    config = ConfigSpace(vendor_id=0x1AF4, device_id=0x1041, class_code=0xFF0000)
    config.add_bar(0, 0x1000, "mem32")
    mapper = BarMapper(machine, "dev.0", threading.RLock(), config, {0: object()})
    config.on_change = mapper.remap
    config.write(0x04, 2, 0x2)                                                 # memory decoding on
    caplog.set_level("INFO", logger="kvmkit.pci")
    for _ in range(GUEST_REPEATS):
        config.write(0x10, 4, 0xE000_0000)                                    # onto "other"
        config.write(0x10, 4, 0xE100_0000)                                    # free
    assert mapper.mapped == {0: 0xE100_0000}
    lines = [r.getMessage() for r in caplog.records if r.name == "kvmkit.pci"]
    assert lines and "overlaps other" in lines[0]
    assert len(lines) <= 11


def test_unusable_queues_do_not_flood_the_log(caplog):
    from kvmkit.memory import GuestMemory
    from kvmkit.virtio.device import VirtioDevice
    from kvmkit.virtio.pci_transport import COMMON, VirtioPciTransport

    class Dev(VirtioDevice):
        device_id = 0x3F
        queue_sizes = (8,)

        def process(self, index):
            pass

    t = VirtioPciTransport(Dev(), GuestMemory(1 << 20, backing=bytearray(1 << 20)))
    caplog.set_level("INFO", logger="kvmkit.virtio")
    for _ in range(GUEST_REPEATS):
        t.write(COMMON + 0x14, 1, 0)                                           # reset
        t.write(COMMON + 0x14, 1, 3)
        t.write(COMMON + 0x08, 4, 1)
        t.write(COMMON + 0x0C, 4, 1)                                           # VERSION_1
        t.write(COMMON + 0x14, 1, 0xB)
        t.write(COMMON + 0x20, 8, 0xFFFF_0000_0000)                           # a ring outside RAM
        t.write(COMMON + 0x1C, 2, 1)
        t.write(COMMON + 0x14, 1, 0xF)                                         # DRIVER_OK
        assert t.status & 64                                                   # NEEDS_RESET
    lines = [r for r in caplog.records if r.name == "kvmkit.virtio"]
    assert 1 <= len(lines) <= 11
