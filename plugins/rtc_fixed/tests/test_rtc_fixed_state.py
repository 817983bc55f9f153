"""rtc-fixed state: its clock runs with the VM, so a restored guest's clock
goes on from the saved time (the time the snapshot lay still does not count)."""
import calendar

from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import FakeContext, config, pio
from kvmkit_rtc import mc146818 as m
from kvmkit_rtc_fixed.clock import FixedStartClock
from kvmkit_rtc_fixed.plugin import SPEC, FixedRtcDevice

Y2K = calendar.timegm((2000, 1, 1, 0, 0, 0))


def reg(ctx, index, value=None):
    pio(ctx, 0x70, value=index)
    return pio(ctx, 0x71, value=value)


def guest_time(ctx):
    b = lambda r: m.from_bcd(reg(ctx, r))     # noqa: E731
    return (b(m.HOURS), b(m.MINUTES), b(m.SECONDS))


def test_restored_clock_goes_on_from_the_saved_run_time():
    mono = [1000.0]
    with FakeContext() as a, FakeContext() as b:
        dev_a = FixedRtcDevice(config(SPEC), a, clock=FixedStartClock(Y2K, lambda: mono[0]))
        dev_a.clock.start()
        mono[0] += 90
        reg(a, 0x20, 0x5A)                                  # NVRAM
        state = save_device(a, dev_a)
        assert state["device"]["elapsed"] == 90
        mono[0] += 5000                                     # lying still does not count
        dev_b = FixedRtcDevice(config(SPEC), b, clock=FixedStartClock(Y2K, lambda: mono[0]))
        restore_device(b, dev_b, state)
        assert guest_time(b) == (0, 1, 30) and reg(b, 0x20) == 0x5A
        dev_b.clock.start()
        mono[0] += 10
        assert guest_time(b) == (0, 1, 40)
