"""Register-level tests of the MC146818 state machine with a fake clock."""
import calendar

import pytest

from kvmkit.testing import FakeIrqLine
from kvmkit_rtc import mc146818 as m
from kvmkit_rtc.mc146818 import Rtc, from_bcd, periodic_interval, to_bcd

T0 = calendar.timegm((2024, 2, 29, 13, 45, 7)) + 0.25      # a Thursday afternoon


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class Rig:
    def __init__(self, t=T0, offset=0):
        self.clock = Clock(t)
        self.irq = FakeIrqLine(8)
        self.reschedules = 0
        self.rtc = Rtc(self.irq, self.clock, offset=offset, on_reschedule=self._resched)

    def _resched(self):
        self.reschedules += 1

    def r(self, reg):
        self.rtc.write(0, 1, reg)
        return self.rtc.read(1, 1)

    def w(self, reg, value):
        self.rtc.write(0, 1, reg)
        self.rtc.write(1, 1, value)

    def time_regs(self):
        return [self.r(reg) for reg in (m.HOURS, m.MINUTES, m.SECONDS)]

    def date_regs(self):
        return [self.r(reg) for reg in (m.CENTURY, m.YEAR, m.MONTH, m.DAY_OF_MONTH, m.DAY_OF_WEEK)]

    def advance(self, seconds):
        self.clock.t += seconds
        self.rtc.tick(self.clock.t)


@pytest.fixture
def rig():
    return Rig()


def test_bcd_helpers():
    assert to_bcd(59) == 0x59 and from_bcd(0x59) == 59
    assert all(from_bcd(to_bcd(v)) == v for v in range(100))


def test_bcd_time_and_date(rig):
    assert rig.time_regs() == [0x13, 0x45, 0x07]
    assert rig.date_regs() == [0x20, 0x24, 0x02, 0x29, 5]      # Thursday is day 5


def test_binary_mode(rig):
    rig.w(m.REG_B, m.B_24H | m.B_DM_BINARY)
    assert rig.time_regs() == [13, 45, 7]
    assert rig.date_regs() == [20, 24, 2, 29, 5]


def test_time_follows_the_clock(rig):
    rig.clock.t += 3600 * 24 + 60 + 53                          # to Friday 1 March 13:47:00
    assert rig.time_regs() == [0x13, 0x47, 0x00]
    assert rig.date_regs() == [0x20, 0x24, 0x03, 0x01, 6]


@pytest.mark.parametrize("hour,bcd,binary", [
    (0, 0x12, 0x0C),            # midnight is 12 AM
    (1, 0x01, 0x01),
    (11, 0x11, 0x0B),
    (12, 0x92, 0x8C),           # noon is 12 PM
    (13, 0x81, 0x81),
    (23, 0x91, 0x8B),
])
def test_twelve_hour_mode(hour, bcd, binary):
    rig = Rig(calendar.timegm((2024, 1, 1, hour, 30, 0)))
    rig.w(m.REG_B, 0)
    assert rig.r(m.HOURS) == bcd
    rig.w(m.REG_B, m.B_DM_BINARY)
    assert rig.r(m.HOURS) == binary


@pytest.mark.parametrize("written,expected", [(0x12, 0), (0x92, 12), (0x81, 13), (0x11, 11)])
def test_guest_writes_twelve_hour_time(rig, written, expected):
    rig.w(m.REG_B, m.B_SET)
    rig.w(m.HOURS, written)
    rig.w(m.REG_B, m.B_24H)
    assert rig.r(m.HOURS) == to_bcd(expected)


def test_utc_offset():
    rig = Rig(offset=-14 * 3600)
    assert rig.time_regs() == [0x23, 0x45, 0x07]
    assert rig.r(m.DAY_OF_MONTH) == 0x28


def test_uip_in_the_last_244us_of_each_second():
    base = calendar.timegm((2024, 1, 1, 0, 0, 0))
    rig = Rig(base + 0.5)
    assert not rig.r(m.REG_A) & m.A_UIP
    rig.clock.t = base + 1 - 200e-6
    assert rig.r(m.REG_A) & m.A_UIP
    assert rig.r(m.SECONDS) == 0x00                             # the update has not happened yet
    rig.clock.t = base + 1 - 300e-6
    assert not rig.r(m.REG_A) & m.A_UIP
    rig.clock.t = base + 1
    assert not rig.r(m.REG_A) & m.A_UIP
    assert rig.r(m.SECONDS) == 0x01


def test_reg_a_keeps_rate_and_divider_but_not_uip(rig):
    rig.w(m.REG_A, 0xAF)
    assert rig.rtc.reg_a == 0x2F
    rig.clock.t = int(rig.clock.t) + 0.5
    assert rig.r(m.REG_A) == 0x2F


def test_reg_d_reports_valid_ram_and_time(rig):
    assert rig.r(m.REG_D) == m.D_VRT
    rig.w(m.REG_D, 0)
    assert rig.r(m.REG_D) == m.D_VRT


def test_set_freezes_the_clock(rig):
    rig.w(m.REG_B, m.B_24H | m.B_SET)
    rig.clock.t += 10
    assert rig.time_regs() == [0x13, 0x45, 0x07]
    rig.clock.t = int(rig.clock.t) + 1 - 100e-6
    assert not rig.r(m.REG_A) & m.A_UIP                         # no updates while SET


def test_guest_sets_the_time(rig):
    rig.w(m.REG_B, m.B_24H | m.B_SET)
    for reg, value in ((m.SECONDS, 0x58), (m.MINUTES, 0x59), (m.HOURS, 0x23),
                       (m.DAY_OF_WEEK, 0x06), (m.DAY_OF_MONTH, 0x31), (m.MONTH, 0x12),
                       (m.YEAR, 0x99), (m.CENTURY, 0x19)):
        rig.w(reg, value)
    rig.clock.t += 100                                          # time spent while SET
    assert rig.time_regs() == [0x23, 0x59, 0x58]
    rig.w(m.REG_B, m.B_24H)
    assert rig.time_regs() == [0x23, 0x59, 0x58]
    assert rig.date_regs() == [0x19, 0x99, 0x12, 0x31, 6]
    rig.clock.t += 2.5                                          # over midnight into 2000
    assert rig.time_regs() == [0x00, 0x00, 0x00]
    assert rig.date_regs() == [0x20, 0x00, 0x01, 0x01, 7]      # 1 Jan 2000 was a Saturday
    assert rig.rtc.now() == pytest.approx(calendar.timegm((2000, 1, 1, 0, 0, 0)) + 0.5)


def test_guest_day_of_week_is_kept_even_when_it_disagrees(rig):
    rig.w(m.REG_B, m.B_24H | m.B_SET)
    rig.w(m.DAY_OF_WEEK, 1)                                     # calls Thursday "Sunday"
    rig.w(m.REG_B, m.B_24H)
    assert rig.r(m.DAY_OF_WEEK) == 1
    rig.clock.t += 86400
    assert rig.r(m.DAY_OF_WEEK) == 2
    rig.clock.t += 86400 * 6
    assert rig.r(m.DAY_OF_WEEK) == 1


def test_write_without_set_keeps_the_clock_running(rig):
    rig.w(m.MINUTES, 0x00)
    assert rig.time_regs() == [0x13, 0x00, 0x07]
    rig.clock.t += 0.75                                         # the second's phase was kept
    assert rig.r(m.SECONDS) == 0x08


def test_set_clears_uie(rig):
    rig.w(m.REG_B, m.B_24H | m.B_UIE)
    rig.w(m.REG_B, m.B_24H | m.B_UIE | m.B_SET)
    assert rig.r(m.REG_B) == m.B_24H | m.B_SET


def test_nvram_reads_back(rig):
    for reg in range(m.NVRAM_START, 0x80):
        if reg != m.CENTURY:
            rig.w(reg, (reg * 7) & 0xFF)
    for reg in range(m.NVRAM_START, 0x80):
        if reg != m.CENTURY:
            assert rig.r(reg) == (reg * 7) & 0xFF
    assert rig.r(m.CENTURY) == 0x20
    assert len(range(m.NVRAM_START, 0x80)) == 114


def test_index_port_masks_the_nmi_bit(rig):
    rig.w(0x20, 0x5A)
    rig.rtc.write(0, 1, 0x80 | 0x20)
    assert rig.rtc.nmi_disabled
    assert rig.rtc.read(1, 1) == 0x5A
    rig.rtc.write(0, 1, 0x20)
    assert not rig.rtc.nmi_disabled
    assert rig.rtc.read(0, 1) == 0xFF                           # the index port is write-only


def test_word_write_sets_index_then_data(rig):
    rig.rtc.write(0, 2, 0x7740)                                 # index 0x40, data 0x77
    assert rig.r(0x40) == 0x77


def test_flags_are_set_even_with_interrupts_disabled(rig):
    rig.advance(1.0)
    assert rig.irq.history == []
    assert rig.r(m.REG_C) == m.C_UF | m.C_PF                    # default rate 1024 Hz runs too
    assert rig.r(m.REG_C) == 0                                  # reading clears


def test_update_interrupt(rig):
    rig.w(m.REG_B, m.B_24H | m.B_UIE)
    rig.r(m.REG_C)
    due = rig.rtc.next_event(rig.clock.t)
    assert due == pytest.approx(int(T0) + 1, abs=1e-5)
    rig.advance(due - rig.clock.t - 0.01)
    assert rig.irq.level is False
    rig.advance(0.02)
    assert rig.irq.level is True
    assert rig.rtc.next_event(rig.clock.t) is None              # the line is already up
    assert rig.r(m.REG_C) & (m.C_IRQF | m.C_UF) == m.C_IRQF | m.C_UF
    assert rig.irq.level is False
    assert rig.irq.history == [True, False]


def test_periodic_interrupt(rig):
    rig.w(m.REG_A, 0x20 | 0x0F)                                 # 2 Hz
    rig.w(m.REG_B, m.B_24H | m.B_PIE)
    rig.r(m.REG_C)
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(int(T0) + 0.5, abs=1e-5)
    rig.advance(0.3)                                            # T0 is x.25: crosses x.5
    assert rig.irq.level is True
    assert rig.r(m.REG_C) == m.C_IRQF | m.C_PF
    rig.advance(0.4)                                            # x.95: no new half second
    assert rig.irq.level is False
    rig.advance(0.1)                                            # crosses the full second
    assert rig.irq.level is True
    assert rig.r(m.REG_C) == m.C_IRQF | m.C_PF | m.C_UF          # UF set, but not enabled


@pytest.mark.parametrize("rate,hz", [(1, 256), (2, 128), (3, 8192), (6, 1024), (15, 2)])
def test_periodic_rates(rate, hz):
    assert periodic_interval(rate) == pytest.approx(1 / hz)
    assert periodic_interval(0) is None


def test_periodic_next_event_at_1024hz(rig):
    rig.w(m.REG_B, m.B_24H | m.B_PIE)                          # default rate 6
    rig.r(m.REG_C)
    now = rig.clock.t
    due = rig.rtc.next_event(now)
    assert 0 < due - now <= 1 / 1024 + 1e-5
    rig.advance(due - now)
    assert rig.irq.level is True


def test_alarm_interrupt(rig):
    rig.w(m.SECONDS_ALARM, 0x10)
    rig.w(m.MINUTES_ALARM, 0x45)
    rig.w(m.HOURS_ALARM, 0x13)
    rig.w(m.REG_B, m.B_24H | m.B_AIE)
    rig.r(m.REG_C)
    alarm = calendar.timegm((2024, 2, 29, 13, 45, 10))
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(alarm, abs=1e-5)
    rig.advance(alarm - rig.clock.t - 0.5)
    assert rig.irq.level is False
    assert not rig.r(m.REG_C) & m.C_AF
    rig.advance(0.6)
    assert rig.irq.level is True
    assert rig.r(m.REG_C) & (m.C_IRQF | m.C_AF) == m.C_IRQF | m.C_AF


def test_alarm_passed_while_nobody_looked_is_still_flagged(rig):
    rig.w(m.SECONDS_ALARM, 0x00)
    rig.w(m.MINUTES_ALARM, 0x00)
    rig.w(m.HOURS_ALARM, 0x14)
    rig.r(m.REG_C)
    rig.clock.t += 7200                                          # past 14:00:00, no ticks
    assert rig.r(m.REG_C) & m.C_AF


def test_alarm_next_day(rig):
    rig.w(m.SECONDS_ALARM, 0x00)
    rig.w(m.MINUTES_ALARM, 0x00)
    rig.w(m.HOURS_ALARM, 0x06)
    rig.w(m.REG_B, m.B_24H | m.B_AIE)
    rig.r(m.REG_C)
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(
        calendar.timegm((2024, 3, 1, 6, 0, 0)), abs=1e-5)


def test_alarm_dont_care_bytes(rig):
    rig.w(m.SECONDS_ALARM, 0x30)
    rig.w(m.MINUTES_ALARM, 0xC0)
    rig.w(m.HOURS_ALARM, 0xFF)                                  # hh:mm:30 every minute
    rig.w(m.REG_B, m.B_24H | m.B_AIE)
    rig.r(m.REG_C)
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(
        calendar.timegm((2024, 2, 29, 13, 45, 30)), abs=1e-5)
    rig.w(m.SECONDS_ALARM, 0xC0)                                # every second
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(int(T0) + 1, abs=1e-5)


def test_alarm_in_twelve_hour_binary_mode(rig):
    rig.w(m.REG_B, m.B_DM_BINARY)
    rig.w(m.SECONDS_ALARM, 0)
    rig.w(m.MINUTES_ALARM, 0)
    rig.w(m.HOURS_ALARM, 0x80 | 3)                              # 3 PM
    rig.w(m.REG_B, m.B_DM_BINARY | m.B_AIE)
    rig.r(m.REG_C)
    assert rig.rtc.next_event(rig.clock.t) == pytest.approx(
        calendar.timegm((2024, 2, 29, 15, 0, 0)), abs=1e-5)


def test_impossible_alarm_never_fires(rig):
    rig.w(m.HOURS_ALARM, 0x25)
    rig.w(m.REG_B, m.B_24H | m.B_AIE)
    assert rig.rtc.next_event(rig.clock.t) is None
    rig.advance(3 * 86400)
    assert not rig.r(m.REG_C) & m.C_AF


def test_no_interrupts_enabled_means_no_event(rig):
    assert rig.rtc.next_event(rig.clock.t) is None


def test_enabling_an_interrupt_with_its_flag_set_raises_the_line(rig):
    rig.advance(1.0)                                            # UF set, UIE off
    assert rig.irq.level is False
    rig.w(m.REG_B, m.B_24H | m.B_UIE)
    assert rig.irq.level is True


def test_no_update_events_while_set_but_periodic_runs(rig):
    rig.w(m.REG_B, m.B_24H | m.B_SET)
    rig.r(m.REG_C)
    rig.advance(5)
    assert rig.r(m.REG_C) == m.C_PF


def test_setting_the_time_is_not_an_update_event(rig):
    rig.w(m.REG_B, m.B_24H | m.B_UIE)
    rig.r(m.REG_C)
    rig.w(m.HOURS, 0x02)                                        # jumps 11 hours back
    rig.w(m.HOURS, 0x20)                                        # and 18 forward
    rig.rtc.tick(rig.clock.t)
    assert rig.irq.level is False


def test_host_clock_going_back_does_not_stop_updates(rig):
    rig.w(m.REG_B, m.B_24H | m.B_UIE)
    rig.r(m.REG_C)
    rig.advance(-3600)
    rig.advance(1.0)
    assert rig.irq.level is True


def test_reschedule_callback(rig):
    before = rig.reschedules
    rig.w(m.REG_A, 0x2A)
    rig.w(m.REG_B, m.B_24H | m.B_PIE)
    rig.w(m.HOURS_ALARM, 1)
    assert rig.reschedules - before == 3
    rig.w(0x40, 1)                                              # NVRAM: nothing to reschedule
    assert rig.reschedules - before == 3
