"""pvpanic state for snapshots: the PCI function's config space (where the
guest put the BAR) and the events the register saw."""
from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import FakeContext, config, plugin_manager
from kvmkit_pvpanic.plugin import SPEC, plugin


def create(ctx):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="pvpanic", config=config(SPEC), ctx=ctx)


def test_config_space_and_events_come_back():
    with FakeContext() as a, FakeContext() as b:
        dev_a = create(a)
        cfg_a, bars_a = a.pci[0]
        cfg_a.write(0x10, 4, 0xFEB0_0000)              # the guest moves the BAR
        cfg_a.write(0x04, 2, 0x0002)                   # and turns memory decoding on
        bars_a[0].write(0, 1, 2)                       # crash kernel loaded
        state = save_device(a, dev_a)
        dev_b = create(b)
        restore_device(b, dev_b, state)
        cfg_b, bars_b = b.pci[0]
        assert cfg_b.bar(0).address == 0xFEB0_0000 and cfg_b.memory_enabled
        assert bars_b[0].read(0, 1) == bars_a[0].read(0, 1)
        assert dev_b.register.events_seen == 2
        assert not b.stop_requests
