"""kvmkit plugin: the ``rtc-fixed`` device kind.

The same MC146818 as the ``rtc`` kind (ports, IRQ, registers, NVRAM, timer
thread: ``kvmkit_rtc``'s classes, reused as they are), fed by a
:class:`~kvmkit_rtc_fixed.clock.FixedStartClock` instead of the host's UTC
clock.  Only the clock differs; the machine file picks one by ``kind``.
"""
from __future__ import annotations

from kvmkit.plugin_api import (DeviceConfig, DeviceContext, DeviceError, DevicePlugin,
                               DeviceSpec, Key)
from kvmkit_rtc.plugin import SPEC as RTC_SPEC, RtcDevice, check as check_ports

from .clock import FixedStartClock, parse_start

KIND = "rtc-fixed"
DEFAULT_START = "2000-01-01T00:00:00Z"

SPEC = DeviceSpec(
    kind=KIND,
    summary="MC146818 CMOS clock that starts at a fixed UTC time when the VM starts "
            "(reproducible guests)",
    keys=(
        RTC_SPEC.key("port"),
        RTC_SPEC.key("irq"),
        Key("start", str, DEFAULT_START,
            "the time the guest reads when the VM starts, ISO-8601 with a time zone "
            "(e.g. \"2000-01-01T00:00:00Z\"); the clock then runs with the VM"),
    ),
)


def check(config: DeviceConfig, devices) -> list[str]:
    """``kvmkit_check_device``: the start time, and the ports (as for ``rtc``)."""
    problems = check_ports(config, devices)
    try:
        parse_start(config["start"])
    except ValueError as e:
        problems.append(f"start: {e}")
    return problems


class FixedRtcDevice(RtcDevice):
    """An :class:`~kvmkit_rtc.plugin.RtcDevice` on a fixed-start clock that
    begins to run in :meth:`start` (just before the first vCPU runs)."""

    def __init__(self, config: DeviceConfig, ctx: DeviceContext, *, clock: FixedStartClock | None = None):
        where = config.where or ctx.name
        if clock is None:
            try:
                clock = FixedStartClock(parse_start(config["start"]))
            except ValueError as e:
                raise DeviceError(f"{where}: start: {e}") from None
        self.clock = clock
        rtc_config = DeviceConfig("rtc", {"port": config["port"], "irq": config["irq"],
                                          "utc_offset": 0}, where)
        super().__init__(rtc_config, ctx, clock=clock)

    # -- snapshots: the clock runs with the VM, so a restored guest's clock goes on from
    # the saved time (the time the snapshot lay still does not count) ----------------------
    def snapshot_state(self) -> dict:
        return {**super().snapshot_state(), "elapsed": self.clock.elapsed}

    def restore_state(self, state: dict) -> None:
        self.clock.carry(state["elapsed"])
        super().restore_state({k: v for k, v in state.items() if k != "elapsed"})

    def start(self) -> None:
        self.clock.start()
        super().start()


plugin = DevicePlugin(SPEC, FixedRtcDevice, check)
