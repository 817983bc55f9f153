"""The rtc plugin through FakeContext."""
import importlib.metadata
import time
import tomllib
from pathlib import Path

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_rtc import mc146818 as m
from kvmkit_rtc.plugin import plugin
from kvmkit_rtc.plugin import SPEC


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="rtc", config=config(SPEC, **values), ctx=ctx)


def reg(ctx, index, value=None, port=0x70):
    pio(ctx, port, value=index)
    return pio(ctx, port + 1, value=value)


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.002)
    return predicate()


def test_spec_keys():
    keys = {k.name: k for k in SPEC.keys}
    assert list(keys) == ["port", "irq", "utc_offset"]
    assert (keys["port"].type, keys["port"].default) == (int, 0x70)
    assert (keys["irq"].type, keys["irq"].default) == (int, 8)
    assert (keys["utc_offset"].type, keys["utc_offset"].default) == (int, 0)
    assert plugin.kvmkit_device_spec() is SPEC


def test_registers_two_ports_and_irq_8():
    with FakeContext() as ctx:
        dev = create(ctx)
        [(base, size, handler)] = ctx.io["pio"]
        assert (base, size, handler) == (0x70, 2, dev.rtc)
        assert list(ctx.irqs) == [8]
        dev.close()


def test_other_port_and_irq():
    with FakeContext() as ctx:
        dev = create(ctx, port=0x170, irq=10)
        assert ctx.io["pio"][0][:2] == (0x170, 2)
        assert list(ctx.irqs) == [10]
        reg(ctx, 0x20, 0x99, port=0x170)
        assert reg(ctx, 0x20, port=0x170) == 0x99
        dev.close()


def test_other_kinds_are_not_ours():
    with FakeContext() as ctx:
        assert plugin.kvmkit_create_device(kind="serial8250", config=config(SPEC), ctx=ctx) is None


def test_port_clash_is_an_error():
    with FakeContext() as ctx:
        ctx.add_io("pio", 0x71, 1, object())
        with pytest.raises(DeviceError, match="overlaps"):
            create(ctx)


def test_reads_host_time_in_bcd():
    with FakeContext() as ctx:
        dev = create(ctx)
        before = time.gmtime()
        year = m.from_bcd(reg(ctx, m.CENTURY)) * 100 + m.from_bcd(reg(ctx, m.YEAR))
        month = m.from_bcd(reg(ctx, m.MONTH))
        assert (year, month) in {(before.tm_year, before.tm_mon), tuple(time.gmtime()[:2])}
        dev.close()


def test_utc_offset_shifts_the_clock():
    with FakeContext() as ctx:
        dev = create(ctx, utc_offset=12 * 3600)
        assert dev.rtc.now() - time.time() == pytest.approx(12 * 3600, abs=1)
        dev.close()


def test_timer_thread_delivers_periodic_interrupts():
    with FakeContext() as ctx:
        dev = create(ctx)
        dev.start()
        reg(ctx, m.REG_A, 0x2A)                       # 64 Hz
        reg(ctx, m.REG_B, m.B_24H | m.B_PIE)
        line = ctx.irqs[8]
        for _ in range(3):
            assert wait_for(lambda: line.level)
            with ctx.lock:                            # as one vCPU access: the thread waits
                assert reg(ctx, m.REG_C) & (m.C_IRQF | m.C_PF) == m.C_IRQF | m.C_PF
                assert line.level is False
        reg(ctx, m.REG_B, m.B_24H)                    # disabled: the line stays down
        reg(ctx, m.REG_C)
        time.sleep(0.1)
        assert line.level is False
        dev.close()


def test_timer_thread_stops_with_the_vm():
    ctx = FakeContext(join_timeout=1.0)
    dev = create(ctx)
    dev.start()
    t0 = time.monotonic()
    ctx.close()
    assert time.monotonic() - t0 < 1.0
    dev.close()


def test_pyproject_declares_the_entry_point():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-rtc"
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {"rtc": "kvmkit_rtc.plugin:plugin"}


def test_installed_entry_point_loads_this_plugin():
    try:
        importlib.metadata.distribution("kvmkit-rtc")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmkit-rtc is not installed")
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices") if e.name == "rtc"]
    assert ep.load() is plugin


@pytest.mark.parametrize("offset", [10 ** 12, -10 ** 12, 2 ** 63])
def test_utc_offset_out_of_range_is_a_one_line_schema_error(offset, tmp_path):
    """Before: accepted, and the guest's first RTC read raised OverflowError
    (the VM stopped with status 1)."""
    from kvmkit.config import ConfigError, DeviceTable, validate_device
    table = DeviceTable("rtc", {"utc_offset": offset}, "m.toml: device[1]", tmp_path)
    with pytest.raises(ConfigError) as e:
        validate_device(table, SPEC)
    message = str(e.value)
    assert "\n" not in message and "m.toml: device[1]" in message and "utc_offset" in message


@pytest.mark.parametrize("sign", [1, -1])
def test_the_largest_utc_offset_reads_fine(sign):
    from kvmkit_rtc.plugin import MAX_UTC_OFFSET
    with FakeContext() as ctx:
        dev = create(ctx, utc_offset=sign * MAX_UTC_OFFSET)
        for index in (m.SECONDS, m.MINUTES, m.HOURS, m.DAY_OF_MONTH, m.MONTH, m.YEAR):
            reg(ctx, index)
        dev.close()
