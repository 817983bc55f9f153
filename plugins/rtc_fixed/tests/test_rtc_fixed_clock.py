"""FixedStartClock and parse_start: pure, no device."""
import calendar

import pytest

from kvmkit_rtc_fixed.clock import FixedStartClock, parse_start

Y2K = calendar.timegm((2000, 1, 1, 0, 0, 0))


class FakeMonotonic:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_parse_utc_with_z():
    assert parse_start("2000-01-01T00:00:00Z") == Y2K


def test_parse_converts_an_offset_to_utc():
    assert parse_start("2000-01-01T02:00:00+02:00") == Y2K


def test_parse_fractional_seconds():
    assert parse_start("2000-01-01T00:00:00.5Z") == Y2K + 0.5


@pytest.mark.parametrize("text, message", [
    ("2000-01-01T00:00:00", "no time zone.*2000-01-01T00:00:00Z"),
    ("yesterday", "not an ISO-8601 time"),
    ("1969-12-31T23:59:59Z", "outside the years 1970-9999"),
    ("", "not an ISO-8601 time"),
])
def test_parse_rejects(text, message):
    with pytest.raises(ValueError, match=message):
        parse_start(text)


def test_clock_stands_still_until_started():
    mono = FakeMonotonic()
    clock = FixedStartClock(Y2K, mono)
    mono.now += 50
    assert clock() == Y2K and clock.elapsed == 0


def test_clock_runs_with_monotonic_time_after_start():
    mono = FakeMonotonic()
    clock = FixedStartClock(Y2K, mono)
    mono.now += 50                      # time before the VM starts does not count
    clock.start()
    mono.now += 90.25
    assert clock() == Y2K + 90.25


def test_second_start_changes_nothing():
    mono = FakeMonotonic()
    clock = FixedStartClock(Y2K, mono)
    clock.start()
    mono.now += 10
    clock.start()
    assert clock() == Y2K + 10


def test_host_wall_clock_is_never_read(monkeypatch):
    import time
    monkeypatch.setattr(time, "time", lambda: pytest.fail("time.time() was read"))
    clock = FixedStartClock(Y2K)
    clock.start()
    assert Y2K <= clock() < Y2K + 5
