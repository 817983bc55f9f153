"""The ACPI platform registers (I/O space): what the FADT and the DSDT point at.

    base + 0  sleep control (FADT SLEEP_CONTROL_REG): SLP_TYP bits 2-4, SLP_EN bit 5
    base + 1  sleep status (FADT SLEEP_STATUS_REG): reads 0 (the VM never wakes)
    base + 2  reset (FADT RESET_REG): RESET_VALUE resets, i.e. ends, the VM
    base + 3  kvmkit's own: the DSDT's GED writes 1 from _INI (the guest runs
              ACPI) and 2 from _EVT (it took a power-button event)

A pure state machine: ``stop(reason, code)`` is the machine's request_stop.
"""
from __future__ import annotations

import logging
from typing import Callable

from .dsdt import EVENT_TAKEN, OSPM_READY, S5_SLP_TYP
from .tables import PowerRegisters

BASE = 0x600
SIZE = 4
SLEEP_CONTROL, SLEEP_STATUS, RESET, OSPM = range(4)
RESET_VALUE = 0x01
SLP_EN = 1 << 5
SLP_TYP_SHIFT, SLP_TYP_MASK = 2, 0x7

log = logging.getLogger("kvmkit.acpi")


def registers(base: int = BASE) -> PowerRegisters:
    return PowerRegisters(sleep_control=base + SLEEP_CONTROL, sleep_status=base + SLEEP_STATUS,
                          reset=base + RESET, reset_value=RESET_VALUE)


class AcpiPlatform:
    def __init__(self, stop: Callable[[str, int], None]):
        self._stop = stop
        self.ospm_ready = False          # the guest's ACPI ran the GED's _INI
        self.events_taken = 0

    def read(self, offset: int, size: int) -> int:
        if offset == OSPM:
            return int(self.ospm_ready)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == SLEEP_CONTROL and value & SLP_EN:
            slp_typ = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK
            if slp_typ == S5_SLP_TYP:
                self._stop("guest power-off", 0)
            else:
                log.warning("guest asked for sleep type %d; only S5 (power-off) is offered", slp_typ)
        elif offset == RESET and value == RESET_VALUE:
            self._stop("guest reset (ACPI)", 0)
        elif offset == OSPM:
            if value == OSPM_READY and not self.ospm_ready:
                self.ospm_ready = True
                log.info("the guest runs ACPI: the power button is the graceful stop")
            elif value == EVENT_TAKEN:
                self.events_taken += 1
                log.info("the guest took the power-button event")
