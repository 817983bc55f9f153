"""rtc state for snapshots: registers, NVRAM, pending interrupt, and a clock
that goes on following the host's time after a restore."""
import calendar
import json

from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import FakeContext, config, pio
from kvmkit_rtc import mc146818 as m
from kvmkit_rtc.plugin import SPEC, RtcDevice


class Clock:
    def __init__(self, t):
        self.t = float(t)

    def __call__(self):
        return self.t


NVRAM = [i for i in range(m.NVRAM_START, m.REGISTERS) if i != m.CENTURY]


def reg(ctx, index, value=None):
    pio(ctx, 0x70, value=index)
    return pio(ctx, 0x71, value=value)


def guest_time(ctx):
    b = lambda r: m.from_bcd(reg(ctx, r))     # noqa: E731
    return (b(m.CENTURY) * 100 + b(m.YEAR), b(m.MONTH), b(m.DAY_OF_MONTH),
            b(m.HOURS), b(m.MINUTES), b(m.SECONDS))


def test_restored_clock_follows_host_time_with_registers_nvram_and_irq():
    host = Clock(calendar.timegm((2026, 12, 3, 12, 0, 0)))
    with FakeContext() as a, FakeContext() as b:
        dev_a = RtcDevice(config(SPEC), a, clock=host)
        reg(a, m.REG_B, m.B_24H | m.B_SET)              # the guest sets its clock to 1999
        for r, v in ((m.CENTURY, 0x19), (m.YEAR, 0x99), (m.MONTH, 0x12), (m.DAY_OF_MONTH, 0x31),
                     (m.HOURS, 0x23), (m.MINUTES, 0x59), (m.SECONDS, 0x00)):
            reg(a, r, v)
        reg(a, m.REG_B, m.B_24H | m.B_UIE)
        for i in NVRAM:
            reg(a, i, (i * 7) & 0xFF)
        reg(a, m.REG_A, 0x2A)
        host.t += 1.5
        dev_a.rtc.tick(host.t)                          # an update ended: UF, IRQ 8 up
        assert a.irqs[8].level
        pio(a, 0x70, value=0x80 | m.REG_D)              # NMI off, index 0x0d
        state = save_device(a, dev_a)
        assert json.loads(json.dumps(state)) == state
        host.t += 100                                   # the snapshot lies still 100 s
        dev_b = RtcDevice(config(SPEC), b, clock=host)
        restore_device(b, dev_b, state)
        assert b.irqs[8].level is True and dev_b.rtc.nmi_disabled and dev_b.rtc.index == m.REG_D
        assert guest_time(b) == guest_time(a) == (2000, 1, 1, 0, 0, 41)
        assert [reg(b, i) for i in NVRAM] == [reg(a, i) for i in NVRAM]
        assert reg(b, m.REG_A) & 0x7F == 0x2A and reg(b, m.REG_B) == m.B_24H | m.B_UIE
        c = reg(b, m.REG_C)
        assert c == reg(a, m.REG_C) and c & (m.C_IRQF | m.C_UF) == m.C_IRQF | m.C_UF
        assert not b.irqs[8].level                      # reading C acknowledged it
        dev_b.rtc.tick(host.t + 1)                      # and the updates go on
        assert b.irqs[8].level


def test_clock_frozen_by_the_guest_stays_frozen():
    host = Clock(calendar.timegm((2026, 12, 3, 12, 0, 0)))
    with FakeContext() as a, FakeContext() as b:
        dev_a = RtcDevice(config(SPEC), a, clock=host)
        reg(a, m.REG_B, m.B_24H | m.B_SET)
        reg(a, m.HOURS, 0x07)
        dev_b = RtcDevice(config(SPEC), b, clock=host)
        restore_device(b, dev_b, save_device(a, dev_a))
        host.t += 5
        assert guest_time(b) == guest_time(a) == (2026, 12, 3, 7, 0, 0)
        reg(b, m.REG_B, m.B_24H)                        # SET off: the clock runs from 07:00
        assert guest_time(b) == (2026, 12, 3, 7, 0, 0)
