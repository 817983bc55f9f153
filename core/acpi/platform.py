"""The ACPI platform registers (I/O space): what the FADT and the DSDT point at.

    base + 0x0  PM1_STS (16 bits, write 1 to clear): no fixed events are raised
    base + 0x2  PM1_EN (16 bits)
    base + 0x4  PM1_CNT (16 bits): SCI_EN reads 1 (always in ACPI mode);
                SLP_TYP bits 10-12 with SLP_EN bit 13 enters a sleep state
    base + 0x6  reserved (the FADT's RESET_REG is the chipset's 0xCF9, see kvmkit.chipset)
    base + 0x7  kvmkit's own: the DSDT's GED writes 1 from _INI (the guest runs
                ACPI) and 2 from _EVT (it took a power-button event)
    base + 0x8  PM_TMR (32 bits): a free-running 3.579545 MHz counter

A small state machine: ``stop(reason, code)`` is the machine's request_stop,
``clock`` a monotonic clock in seconds.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from .. import chipset
from ..guest_log import GuestLog
from .dsdt import EVENT_TAKEN, OSPM_READY, S5_SLP_TYP
from .tables import PowerRegisters

BASE = 0x600
SIZE = 12
PM1_STS, PM1_EN, PM1_CNT, OSPM, PM_TMR = 0x0, 0x2, 0x4, 0x7, 0x8
SCI_IRQ = 9
SCI_EN = 1 << 0
SLP_EN = 1 << 13
SLP_TYP_SHIFT, SLP_TYP_MASK = 10, 0x7
PM_TIMER_HZ = 3_579_545

log = logging.getLogger("kvmkit.acpi")


def registers(base: int = BASE) -> PowerRegisters:
    return PowerRegisters(pm1a_event=base + PM1_STS, pm1a_control=base + PM1_CNT,
                          pm_timer=base + PM_TMR, reset=chipset.RESET_CONTROL_PORT,
                          reset_value=chipset.RESET_VALUE,
                          sci_irq=SCI_IRQ)


class AcpiPlatform:
    def __init__(self, stop: Callable[[str, int], None], clock: Callable[[], float] = time.monotonic):
        self._stop = stop
        self._clock = clock
        self.glog = GuestLog(log)        # what guest port writes make us log, rate-limited
        self._t0 = clock()
        self.pm1_enable = 0
        self.ospm_ready = False          # the guest's ACPI ran the GED's _INI
        self.events_taken = 0

    def save_state(self) -> dict:
        """The registers the guest set, and the PM timer's count in seconds."""
        return {"pm1_enable": self.pm1_enable, "ospm_ready": self.ospm_ready,
                "events_taken": self.events_taken, "timer_s": self._clock() - self._t0}

    def restore_state(self, state: dict, elapsed_s: float = 0.0) -> None:
        """The PM timer runs on from its saved count plus ``elapsed_s`` (the
        time the VM spent saved), as the guest's other clocks do."""
        self.pm1_enable = int(state["pm1_enable"]) & 0xFFFF
        self.ospm_ready = bool(state["ospm_ready"])
        self.events_taken = int(state["events_taken"])
        self._t0 = self._clock() - float(state["timer_s"]) - elapsed_s

    def read(self, offset: int, size: int) -> int:
        if PM_TMR <= offset < PM_TMR + 4:
            ticks = int((self._clock() - self._t0) * PM_TIMER_HZ) & 0xFFFF_FFFF
            return (ticks >> (8 * (offset - PM_TMR))) & ((1 << (8 * size)) - 1)
        value = {PM1_EN: self.pm1_enable, PM1_CNT: SCI_EN, OSPM: int(self.ospm_ready)}.get(offset, 0)
        return value & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == PM1_EN:
            self.pm1_enable = value & 0xFFFF
        elif offset == PM1_CNT and value & SLP_EN:
            slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
            if slp_typ == S5_SLP_TYP:
                self._stop("guest power-off", 0)
            else:
                self.glog.warning("sleep", "guest asked for sleep type %d; only S5 (power-off) is offered",
                                  slp_typ)
        elif offset == OSPM:
            if value & 0xFF == OSPM_READY and not self.ospm_ready:
                self.ospm_ready = True
                log.info("the guest runs ACPI: the power button is the graceful stop")
            elif value & 0xFF == EVENT_TAKEN:
                self.events_taken += 1
                self.glog.info("event", "the guest took the power-button event")
