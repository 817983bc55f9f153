"""The i8042 plugin through FakeContext."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_i8042.plugin import plugin
from kvmkit_i8042.plugin import SPEC


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="i8042", config=config(SPEC, **values), ctx=ctx)


def test_spec_keys():
    assert [(k.name, k.type, k.default) for k in SPEC.keys] == [
        ("irq", int, 1), ("aux_irq", int, 12)]
    assert plugin.kvmkit_device_spec() is SPEC


def test_registers_two_one_byte_ranges():
    with FakeContext() as ctx:
        create(ctx)
        assert sorted((base, size) for base, size, _ in ctx.io["pio"]) == [(0x60, 1), (0x64, 1)]
        ctx.add_io("pio", 0x61, 3, object())          # the ports between stay free
        assert sorted(ctx.irqs) == [1, 12]


def test_other_kinds_are_not_ours():
    with FakeContext() as ctx:
        assert plugin.kvmkit_create_device(kind="rtc", config=config(SPEC), ctx=ctx) is None


def test_self_test_through_the_ports():
    with FakeContext() as ctx:
        create(ctx)
        pio(ctx, 0x64, value=0xAA)
        assert pio(ctx, 0x64) & 0x01
        assert ctx.irqs[1].level is True
        assert pio(ctx, 0x60) == 0x55
        assert ctx.irqs[1].level is False


def test_reset_requests_a_stop():
    with FakeContext() as ctx:
        create(ctx)
        pio(ctx, 0x64, value=0xFE)
        assert ctx.stop_requests == [("guest reset (i8042)", 0)]
        assert ctx.stopping.is_set()


def test_custom_irqs():
    with FakeContext() as ctx:
        create(ctx, irq=9, aux_irq=10)
        assert sorted(ctx.irqs) == [9, 10]


def test_send_key_from_the_host():
    with FakeContext() as ctx:
        dev = create(ctx)
        dev.start()
        assert dev.send_key(b"\x1e\x9e")
        assert [pio(ctx, 0x60), pio(ctx, 0x60)] == [0x1E, 0x9E]
        dev.close()


def test_pyproject_declares_the_entry_point():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-i8042"
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {"i8042": "kvmkit_i8042.plugin:plugin"}


def test_installed_entry_point_loads_this_plugin():
    try:
        importlib.metadata.distribution("kvmkit-i8042")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmkit-i8042 is not installed")
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices") if e.name == "i8042"]
    assert ep.load() is plugin


def test_graceful_stop_types_ctrl_alt_del():
    from kvmkit_i8042.plugin import CTRL_ALT_DEL
    with FakeContext() as ctx:
        create(ctx)
        pio(ctx, 0x64, value=0x60)          # write the command byte: keyboard interrupt on
        pio(ctx, 0x60, value=0x01)
        ctx.request_shutdown()
        typed = []
        while pio(ctx, 0x64) & 0x01:        # output buffer full
            typed.append(pio(ctx, 0x60))
        assert bytes(typed) == CTRL_ALT_DEL
        assert ctx.irqs[1].history.count(True) >= 1
