from kvmkit.plugin_api import EXIT_GUEST_PANIC
from kvmkit.testing import FakeContext, config, plugin_manager

from kvmkit_pvpanic.plugin import SPEC, plugin


def create(ctx):
    return plugin_manager(plugin).hook.kvmkit_create_device(kind="pvpanic", config=config(SPEC), ctx=ctx)


def test_pci_identity_linux_binds():
    with FakeContext() as ctx:
        create(ctx)
        [(cfg, bars)] = ctx.pci
        assert cfg.read(0, 2) == 0x1B36 and cfg.read(2, 2) == 0x0011
        assert cfg.bar(0).size == 0x1000 and set(bars) == {0}


def test_supported_events_and_panic_stops_with_its_status():
    with FakeContext() as ctx:
        create(ctx)
        reg = ctx.pci[0][1][0]
        assert reg.read(0, 1) == 0b11
        reg.write(0, 1, 2)                       # crash kernel loaded: informational
        assert ctx.stop_requests == []
        reg.write(0, 1, 1)
        assert ctx.stop_requests == [("guest kernel panicked (pvpanic)", EXIT_GUEST_PANIC)]


def test_garbage_writes_are_ignored():
    with FakeContext() as ctx:
        create(ctx)
        reg = ctx.pci[0][1][0]
        for offset, value in ((1, 1), (0, 0), (0, 0xFC), (8, 0xFF)):
            reg.write(offset, 1, value)
        assert ctx.stop_requests == []
        assert reg.read(4, 4) == 0


def test_a_guest_repeating_crash_loaded_does_not_flood_the_log(caplog):
    with FakeContext() as ctx:
        create(ctx)
        reg = ctx.pci[0][1][0]
        caplog.set_level("INFO")
        for _ in range(5_000):
            reg.write(0, 1, 2)
        assert ctx.stop_requests == []
    lines = [r for r in caplog.records if "crash kernel" in r.getMessage()]
    assert 1 <= len(lines) <= 11
