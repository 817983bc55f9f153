"""The rtc-fixed plugin through FakeContext: the rtc kind's chip on a fixed clock."""
import calendar
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from kvmkit.config import ConfigError, DeviceTable, validate_device
from kvmkit.plugin_api import DeviceError
from kvmkit.plugins import load_kinds, new_manager
from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_rtc import mc146818 as m
from kvmkit_rtc.plugin import SPEC as RTC_SPEC
from kvmkit_rtc_fixed.clock import FixedStartClock
from kvmkit_rtc_fixed.plugin import SPEC, FixedRtcDevice, plugin

Y2K = calendar.timegm((2000, 1, 1, 0, 0, 0))


class FakeMonotonic:
    def __init__(self):
        self.now = 500.0

    def __call__(self):
        return self.now


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="rtc-fixed", config=config(SPEC, **values), ctx=ctx)


def reg(ctx, index, value=None, port=0x70):
    pio(ctx, port, value=index)
    return pio(ctx, port + 1, value=value)


def guest_time(ctx, port=0x70):
    """(year, month, day, hours, minutes, seconds) as a BCD 24-hour guest reads them."""
    b = lambda r: m.from_bcd(reg(ctx, r, port=port))     # noqa: E731
    return (b(m.CENTURY) * 100 + b(m.YEAR), b(m.MONTH), b(m.DAY_OF_MONTH),
            b(m.HOURS), b(m.MINUTES), b(m.SECONDS))


def test_spec_has_the_rtc_ports_and_irq_and_a_start():
    keys = {k.name: k for k in SPEC.keys}
    assert list(keys) == ["port", "irq", "start"]
    assert keys["port"] == RTC_SPEC.key("port") and keys["irq"] == RTC_SPEC.key("irq")
    assert (keys["start"].type, keys["start"].default) == (str, "2000-01-01T00:00:00Z")
    assert SPEC.kind == "rtc-fixed" != RTC_SPEC.kind


def test_guest_reads_the_default_start_before_the_vm_runs():
    with FakeContext() as ctx:
        dev = create(ctx)
        assert guest_time(ctx) == (2000, 1, 1, 0, 0, 0)
        dev.close()


def test_same_ports_and_irq_as_rtc():
    with FakeContext() as ctx:
        dev = create(ctx)
        assert [(b, s) for b, s, _ in ctx.io["pio"]] == [(0x70, 2)]
        assert list(ctx.irqs) == [8]
        dev.close()


def test_other_port_and_irq():
    with FakeContext() as ctx:
        dev = create(ctx, port=0x170, irq=10, start="2024-02-29T23:59:30Z")
        assert list(ctx.irqs) == [10]
        assert guest_time(ctx, port=0x170) == (2024, 2, 29, 23, 59, 30)
        dev.close()


def test_clock_runs_from_vm_start():
    mono = FakeMonotonic()
    with FakeContext() as ctx:
        cfg = config(SPEC, start="2024-02-29T23:59:30Z")
        dev = FixedRtcDevice(cfg, ctx, clock=FixedStartClock(calendar.timegm((2024, 2, 29, 23, 59, 30)), mono))
        mono.now += 3600                            # before start: nothing moves
        assert guest_time(ctx) == (2024, 2, 29, 23, 59, 30)
        dev.start()
        mono.now += 45                              # across the leap-day rollover
        assert guest_time(ctx) == (2024, 3, 1, 0, 0, 15)
        dev.close()


def test_guest_can_set_its_clock_and_it_keeps_running():
    mono = FakeMonotonic()
    with FakeContext() as ctx:
        dev = FixedRtcDevice(config(SPEC), ctx, clock=FixedStartClock(Y2K, mono))
        dev.start()
        reg(ctx, m.REG_B, m.B_SET | m.B_24H)
        reg(ctx, m.YEAR, 0x30)
        reg(ctx, m.REG_B, m.B_24H)
        mono.now += 2
        assert guest_time(ctx) == (2030, 1, 1, 0, 0, 2)
        dev.close()


def test_timer_thread_starts_and_stops():
    mono = FakeMonotonic()
    ctx = FakeContext(join_timeout=1.0)
    dev = FixedRtcDevice(config(SPEC), ctx, clock=FixedStartClock(Y2K, mono))
    mono.now += 7
    assert dev.clock.elapsed == 0 and not ctx.threads      # stands still until start()
    dev.start()
    mono.now += 3
    assert dev.clock.elapsed == 3 and [t.is_alive() for t in ctx.threads] == [True]
    ctx.close()
    dev.close()
    assert not any(t.is_alive() for t in ctx.threads)


def test_bad_start_is_a_device_error_naming_the_key():
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match=r"start: '2000-01-01' has no time zone"):
            create(ctx, start="2000-01-01")


def test_machine_file_types_are_checked_by_the_schema(tmp_path):
    table = DeviceTable("rtc-fixed", {"start": 2000}, "m.toml: device[0] (rtc-fixed)", tmp_path)
    with pytest.raises(ConfigError, match=r"device\[0\] \(rtc-fixed\): start: expected a string"):
        validate_device(table, SPEC)


def test_pyproject_declares_the_entry_point_and_depends_on_rtc():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-rtc-fixed"
    assert "kvmkit-rtc" in meta["project"]["dependencies"]
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {
        "rtc-fixed": "kvmkit_rtc_fixed.plugin:plugin"}


def test_both_emulations_load_side_by_side_and_the_kind_picks_one():
    try:
        importlib.metadata.distribution("kvmkit-rtc-fixed")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmkit-rtc-fixed is not installed")
    pm = new_manager()
    loaded = load_kinds(pm, ["rtc", "rtc-fixed"])
    assert loaded["rtc"].distribution == "kvmkit-rtc"
    assert loaded["rtc-fixed"].distribution == "kvmkit-rtc-fixed"
    with FakeContext() as ctx:
        dev = pm.hook.kvmkit_create_device(kind="rtc-fixed", config=config(SPEC), ctx=ctx)
        assert isinstance(dev, FixedRtcDevice)
        assert guest_time(ctx)[0] == 2000
        dev.close()
