"""kvmkit plugin: the ``rtc`` device kind (MC146818 CMOS clock)."""
from __future__ import annotations

import threading
import time
from typing import Callable

from kvmkit.plugin_api import PIO, DeviceConfig, DeviceContext, DeviceSpec, Key, DevicePlugin

from .mc146818 import Rtc

KIND = "rtc"
IDLE_POLL_S = 0.25          # how often an idle timer thread looks at ctx.stopping
# Guest time must stay a date the clock (and the host's gmtime) can show:
# 100 years either way keeps it within years 1900-2200 for any host date now.
MAX_UTC_OFFSET = 100 * 365 * 86400

SPEC = DeviceSpec(
    kind=KIND,
    summary="MC146818 CMOS real-time clock with 114 bytes of NVRAM",
    keys=(
        Key("port", int, 0x70, "index port; the data port follows it", min=0, max=0xFFFE),
        Key("irq", int, 8, "ISA IRQ of the clock's interrupts", min=0, max=23),
        Key("utc_offset", int, 0,
            "seconds added to host UTC (e.g. 3600 for a guest that keeps local time at UTC+1); "
            "at most 100 years either way", min=-MAX_UTC_OFFSET, max=MAX_UTC_OFFSET),
    ),
)


CLOCK_KINDS = ("rtc", "rtc-fixed")     # the same MC146818 on different clocks


def check(config: DeviceConfig, devices) -> list[str]:
    """``kvmkit_check_device``: a clock on the ports of an earlier one."""
    port = config["port"]
    for other in devices:
        if other is config:
            break
        if other.kind in CLOCK_KINDS and abs(other["port"] - port) < 2:
            return [f"ports {port:#x}-{port + 1:#x} overlap those of {other.table}; a machine "
                    "has one CMOS clock (or give this one another port =)"]
    return []


class RtcDevice:
    """The clock on its two ports, with a thread that delivers its interrupts."""

    def __init__(self, config: DeviceConfig, ctx: DeviceContext,
                 clock: Callable[[], float] = time.time):
        self._ctx = ctx
        self._clock = clock
        self._wake = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.rtc = Rtc(ctx.irq(config["irq"]), clock, offset=config["utc_offset"],
                       on_reschedule=self._wake.set)
        ctx.add_io(PIO, config["port"], 2, self.rtc)
        self.port, self.irq = config["port"], config["irq"]

    def acpi_node(self, aml) -> bytes:
        """The clock as a PNP0B00 device in the guest's DSDT (its two ports, its IRQ)."""
        irq = aml.irq_no_flags(self.irq) if self.irq < 16 else aml.interrupt(self.irq, edge=True)
        return aml.device("RTC_" if self.port == 0x70 else f"R{self.port & 0xFFF:03X}",
                          aml.name("_HID", aml.eisaid("PNP0B00")),
                          aml.name("_CRS", aml.resource_template(aml.io(self.port, 2), irq)))

    # -- snapshots (kvmkit.device_state; called with the VM paused) ---------------------
    def snapshot_state(self) -> dict:
        return self.rtc.snapshot_state()

    def restore_state(self, state: dict) -> None:
        self.rtc.restore_state(state)

    def start(self) -> None:
        self._thread = self._ctx.spawn("timer", self._run)

    def _run(self) -> None:
        stopping = self._ctx.stopping
        while not stopping.is_set() and not self._closed:
            self._wake.clear()
            with self._ctx.lock:
                now = self._clock()
                self.rtc.tick(now)
                due = self.rtc.next_event(now)
            delay = IDLE_POLL_S if due is None else min(max(due - now, 0.0), IDLE_POLL_S)
            self._wake.wait(delay)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)


plugin = DevicePlugin(SPEC, RtcDevice, check)
