"""The MC146818 CMOS real-time clock as a pure state machine.

Time comes from an injected clock (seconds since the epoch, a float); the
guest sees ``clock() + offset`` as a broken-down UTC time, so writing the
clock only changes ``offset``.  Interrupt flags are computed lazily from the
clock: :meth:`Rtc.tick` accounts for every periodic, update-ended and alarm
event up to ``now``, :meth:`Rtc.next_event` says when the next interrupt is
due, and a reader of register C always sees the flags as of that moment.
"""
from __future__ import annotations

import calendar
import math
import time
from typing import Callable

from kvmkit.plugin_api import IrqLine

# register indexes
SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = range(6)
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = range(6, 10)
REG_A, REG_B, REG_C, REG_D = range(10, 14)
CENTURY = 0x32
NVRAM_START = 0x0E
REGISTERS = 0x80

# register A
A_UIP = 0x80
A_RATE = 0x0F
# register B
B_SET = 0x80
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10
B_DM_BINARY = 0x04
B_24H = 0x02
# register C
C_IRQF = 0x80
C_PF = 0x40
C_AF = 0x20
C_UF = 0x10
# register D
D_VRT = 0x80

UIP_WINDOW_S = 244e-6           # UIP is set this long before each second rollover
BASE_HZ = 32768
EPSILON_S = 1e-6                # keeps next_event() past float rounding of the offset
DONT_CARE = 0xC0                # alarm bytes 0xC0-0xFF match every value

TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)


def periodic_interval(rate: int) -> float | None:
    """Seconds between periodic interrupts for a register A rate selector."""
    if rate == 0:
        return None
    if rate < 3:                                 # 1 and 2 alias 8 and 9
        rate += 7
    return (1 << (rate - 1)) / BASE_HZ


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


def _dow(days_since_epoch: int) -> int:
    """Day of week 1 (Sunday) .. 7 (Saturday); 1970-01-01 was a Thursday."""
    return (days_since_epoch + 4) % 7 + 1


class Rtc:
    """One MC146818.  Not thread-safe: the caller serialises access.

    ``on_reschedule`` (optional) is called whenever the guest changed
    something that moves the next interrupt (rates, enables, the time, an
    acknowledged interrupt), so a timer thread can recompute its sleep.
    """

    def __init__(self, irq: IrqLine, clock: Callable[[], float] = time.time,
                 offset: float = 0.0, on_reschedule: Callable[[], None] | None = None):
        self._irq = irq
        self._clock = clock
        self._on_reschedule = on_reschedule
        self.offset = float(offset)               # guest time = clock() + offset
        self.index = 0
        self.nmi_disabled = False
        self.reg_a = 0x26                         # 32.768 kHz divider, 1024 Hz rate
        self.reg_b = B_24H                        # 24-hour BCD, what PC firmware leaves
        self._flags = 0                           # register C PF/AF/UF
        self._irq_level = False
        self._dow_adjust = 0                      # guest-written day of week vs the calendar
        self._frozen: dict[int, int] | None = None   # time fields while SET is on
        self.alarm = [0, 0, 0]                    # raw seconds/minutes/hours alarm bytes
        self.nvram = bytearray(REGISTERS)
        self._checked = self._clock() + self.offset   # guest time accounted for by tick()

    # -- snapshots -------------------------------------------------------------------------
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        """Registers, NVRAM, pending flags and the clock as ``offset`` from
        the injected clock: restored, the guest's time goes on following
        that clock (the host's time for ``rtc``), so it jumps forward by the
        time the snapshot lay still, as after a host suspend."""
        frozen = None if self._frozen is None else {str(k): v for k, v in self._frozen.items()}
        return {"version": self.STATE_VERSION, "offset": self.offset, "index": self.index,
                "nmi_disabled": self.nmi_disabled, "reg_a": self.reg_a, "reg_b": self.reg_b,
                "flags": self._flags, "irq_level": self._irq_level,
                "dow_adjust": self._dow_adjust, "frozen": frozen, "alarm": list(self.alarm),
                "nvram": bytes(self.nvram).hex(), "checked": self._checked}

    def restore_state(self, state: dict) -> None:
        """Put a :meth:`snapshot_state` back and drive the IRQ line to the
        saved level.  Events due while the snapshot lay still (an update, a
        periodic tick, the alarm) are flagged at the next tick, once each."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"MC146818 state version {state.get('version')!r}; this plugin reads "
                             f"version {self.STATE_VERSION}")
        nvram = bytes.fromhex(state["nvram"])
        if len(nvram) != len(self.nvram):
            raise ValueError(f"MC146818 state has {len(nvram)} NVRAM bytes, not {len(self.nvram)}")
        self.offset = float(state["offset"])
        self.index = state["index"] & 0x7F
        self.nmi_disabled = bool(state["nmi_disabled"])
        self.reg_a = state["reg_a"] & 0x7F
        self.reg_b = state["reg_b"] & 0xFF
        self._flags = state["flags"] & 0x70
        self._dow_adjust = state["dow_adjust"] % 7
        frozen = state["frozen"]
        self._frozen = None if frozen is None else {int(k): int(v) for k, v in frozen.items()}
        self.alarm = [int(v) & 0xFF for v in state["alarm"]][:3]
        self.nvram[:] = nvram
        self._checked = float(state["checked"])
        self._irq_level = bool(state["irq_level"])
        if self._irq_level:
            self._irq.set_level(True)
        self._update_irq()
        self._reschedule()

    # -- bus interface: index port at offset 0, data port at offset 1 ---------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):                    # a wide access touches both ports in turn
            byte = self.read_register(self.index) if offset + i == 1 else 0xFF
            value |= byte << (8 * i)             # (the index port is write-only)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            byte = (value >> (8 * i)) & 0xFF
            if offset + i == 0:
                self.index = byte & 0x7F
                self.nmi_disabled = bool(byte & 0x80)
            elif offset + i == 1:
                self.write_register(self.index, byte)

    # -- registers -----------------------------------------------------------------------
    def read_register(self, reg: int) -> int:
        if reg in TIME_REGISTERS:
            return self._encode(reg, self._time_fields()[reg])
        if reg in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
            return self.alarm[reg // 2]
        if reg == REG_A:
            return self.reg_a | (A_UIP if self.update_in_progress() else 0)
        if reg == REG_B:
            return self.reg_b
        if reg == REG_C:
            return self._read_reg_c()
        if reg == REG_D:
            return D_VRT
        return self.nvram[reg]

    def write_register(self, reg: int, value: int) -> None:
        if reg in TIME_REGISTERS:
            self._write_time(reg, self._decode(reg, value))
        elif reg in (SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM):
            self.alarm[reg // 2] = value
            self._reschedule()
        elif reg == REG_A:
            self.reg_a = value & 0x7F             # UIP is read-only
            self._reschedule()
        elif reg == REG_B:
            self._write_reg_b(value)
        elif reg in (REG_C, REG_D):
            pass                                  # read-only
        else:
            self.nvram[reg] = value

    # -- time ----------------------------------------------------------------------------
    def now(self) -> float:
        """The guest's time (seconds since the epoch, UTC as the guest sees it)."""
        return self._clock() + self.offset

    def update_in_progress(self) -> bool:
        if self.reg_b & B_SET:
            return False
        t = self.now()
        return t - math.floor(t) >= 1.0 - UIP_WINDOW_S

    def _time_fields(self) -> dict[int, int]:
        if self._frozen is not None:
            return self._frozen
        return self._fields_at(math.floor(self.now()))

    def _fields_at(self, seconds: int) -> dict[int, int]:
        tm = time.gmtime(seconds)
        dow = (_dow(seconds // 86400) - 1 + self._dow_adjust) % 7 + 1
        return {SECONDS: tm.tm_sec, MINUTES: tm.tm_min, HOURS: tm.tm_hour,
                DAY_OF_WEEK: dow, DAY_OF_MONTH: tm.tm_mday, MONTH: tm.tm_mon,
                YEAR: tm.tm_year % 100, CENTURY: tm.tm_year // 100}

    def _write_time(self, reg: int, value: int) -> None:
        if self._frozen is not None:              # SET on: takes effect when SET ends
            self._frozen[reg] = value
            return
        t = self.now()
        fields = self._fields_at(math.floor(t))
        fields[reg] = value
        self._set_time(fields, fraction=t - math.floor(t))

    def _set_time(self, fields: dict[int, int], fraction: float = 0.0) -> None:
        """Make the guest's clock show ``fields`` now (keeping ``fraction``)."""
        year = min(max(fields[CENTURY] * 100 + fields[YEAR], 1), 9999)
        month = min(max(fields[MONTH], 1), 12)
        seconds = calendar.timegm((year, month, fields[DAY_OF_MONTH], fields[HOURS],
                                   fields[MINUTES], fields[SECONDS], 0, 0, 0))
        self._dow_adjust = (fields[DAY_OF_WEEK] - _dow(seconds // 86400)) % 7
        self.offset = seconds + fraction - self._clock()
        self._checked = self.now()                # no events for the jump itself
        self._reschedule()

    def _write_reg_b(self, value: int) -> None:
        self._advance(self._clock())              # flags as of now, under the old enables
        was_set = self.reg_b & B_SET
        if value & B_SET:
            value &= ~B_UIE                       # SET clears UIE
            if not was_set:
                self._frozen = self._fields_at(math.floor(self.now()))
        self.reg_b = value
        if was_set and not value & B_SET:
            frozen, self._frozen = self._frozen, None
            self._set_time(frozen)
        self._update_irq()
        self._reschedule()

    # -- BCD / binary, 12 / 24 hours -------------------------------------------------------
    def _encode(self, reg: int, value: int) -> int:
        pm = 0
        if reg == HOURS and not self.reg_b & B_24H:
            pm = 0x80 if value >= 12 else 0
            value = value % 12 or 12
        if not self.reg_b & B_DM_BINARY:
            value = to_bcd(value)
        return value | pm

    def _decode(self, reg: int, value: int) -> int:
        pm = False
        if reg == HOURS and not self.reg_b & B_24H:
            pm = bool(value & 0x80)
            value &= 0x7F
        if not self.reg_b & B_DM_BINARY:
            value = from_bcd(value)
        if reg == HOURS and not self.reg_b & B_24H:
            value = value % 12 + (12 if pm else 0)
        return value

    # -- interrupts ----------------------------------------------------------------------
    def tick(self, now: float) -> None:
        """Account for every event up to host time ``now`` and drive the IRQ line."""
        self._advance(now)
        self._update_irq()

    def next_event(self, now: float) -> float | None:
        """Host time of the next event that would raise the IRQ line, or None
        when no enabled interrupt can come (or the line is already up)."""
        if self._irq_level:
            return None
        t = now + self.offset
        candidates = []
        interval = periodic_interval(self.reg_a & A_RATE)
        if self.reg_b & B_PIE and interval is not None:
            candidates.append((math.floor(t / interval) + 1) * interval)
        if not self.reg_b & B_SET:
            if self.reg_b & B_UIE:
                candidates.append(math.floor(t) + 1)
            if self.reg_b & B_AIE:
                alarm = self._next_alarm(math.floor(t) + 1)
                if alarm is not None:
                    candidates.append(alarm)
        if not candidates:
            return None
        return min(candidates) - self.offset + EPSILON_S

    def _advance(self, now: float) -> None:
        t = now + self.offset
        last = self._checked
        if t <= last:
            if t < last - 1.0:                    # the host clock went back: start over
                self._checked = t
            return
        interval = periodic_interval(self.reg_a & A_RATE)
        if interval is not None and math.floor(t / interval) > math.floor(last / interval):
            self._flags |= C_PF
        if not self.reg_b & B_SET and math.floor(t) > math.floor(last):
            self._flags |= C_UF
            alarm = self._next_alarm(math.floor(last) + 1)
            if alarm is not None and alarm <= t:
                self._flags |= C_AF
        self._checked = t

    def _alarm_targets(self) -> list[range | tuple[int]] | None:
        """Seconds, minutes, hours that match the alarm; None if it never can."""
        targets = []
        for reg, limit in ((SECONDS, 60), (MINUTES, 60), (HOURS, 24)):
            raw = self.alarm[reg // 2]
            if raw & DONT_CARE == DONT_CARE:
                targets.append(range(limit))
                continue
            twelve = reg == HOURS and not self.reg_b & B_24H
            value = raw & 0x7F if twelve else raw
            if not self.reg_b & B_DM_BINARY:
                value = from_bcd(value)
            if twelve:
                if not 1 <= value <= 12:
                    return None
                value = value % 12 + (12 if raw & 0x80 else 0)
            if value >= limit:
                return None
            targets.append((value,))
        return targets

    def _next_alarm(self, start: int) -> int | None:
        """The first whole second >= ``start`` (guest time) the alarm matches."""
        targets = self._alarm_targets()
        if targets is None:
            return None
        seconds, minutes, hours = targets
        day = start - start % 86400
        for midnight in (day, day + 86400):
            for h in hours:
                for m in minutes:
                    base = midnight + h * 3600 + m * 60
                    if base + 59 < start:
                        continue
                    for s in seconds:
                        if base + s >= start:
                            return base + s
        return None

    def _read_reg_c(self) -> int:
        self._advance(self._clock())
        value = self._flags | (C_IRQF if self._irq_pending() else 0)
        self._flags = 0
        self._update_irq()
        if value:
            self._reschedule()
        return value

    def _irq_pending(self) -> bool:
        enabled = self.reg_b & (B_PIE | B_AIE | B_UIE)   # same bit positions as PF/AF/UF
        return bool(self._flags & enabled)

    def _update_irq(self) -> None:
        level = self._irq_pending()
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)

    def _reschedule(self) -> None:
        if self._on_reschedule is not None:
            self._on_reschedule()
