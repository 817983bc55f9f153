"""A clock that reads a fixed start time plus the time the VM has run.

The MC146818 state machine of ``kvmkit-rtc`` takes its time from an injected
clock (seconds since the epoch).  :class:`FixedStartClock` is such a clock:
it reads ``start`` until :meth:`FixedStartClock.start` is called (when the VM
starts), then ``start`` plus the host's monotonic time since then.  The
host's wall clock never enters, so every boot of the guest sees the same
date, whatever the host's date and time zone, and NTP steps on the host do
not move it.
"""
from __future__ import annotations

import datetime
import time
from typing import Callable

EARLIEST_YEAR = 1970          # the clock counts seconds from the epoch
LATEST_YEAR = 9999            # four digits in the century and year registers


def parse_start(text: str) -> float:
    """Seconds since the epoch of an ISO-8601 time with a time zone
    (``2000-01-01T00:00:00Z``, ``2024-06-30T12:00:00+02:00``).  ValueError,
    with what to write instead, for anything else."""
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO-8601 time such as 2000-01-01T00:00:00Z") from None
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"{text!r} has no time zone: write it in UTC with a Z, "
                         f"e.g. {when.isoformat()}Z")
    when = when.astimezone(datetime.timezone.utc)
    if not EARLIEST_YEAR <= when.year <= LATEST_YEAR:
        raise ValueError(f"{text!r} is outside the years {EARLIEST_YEAR}-{LATEST_YEAR} "
                         "the clock can hold")
    return when.timestamp()


class FixedStartClock:
    """``start`` (seconds since the epoch) plus the guest-visible elapsed time.

    ``monotonic`` is the source of elapsed time (injected in tests).  Before
    :meth:`start` the clock stands still at ``start``.
    """

    def __init__(self, start: float, monotonic: Callable[[], float] = time.monotonic):
        self.start_time = float(start)
        self._monotonic = monotonic
        self._started_at: float | None = None
        self._carried = 0.0                 # run time of the VM this one was restored from

    def start(self) -> None:
        """The VM starts: from now on the clock runs.  A second call changes nothing."""
        if self._started_at is None:
            self._started_at = self._monotonic()

    def carry(self, elapsed: float) -> None:
        """A restored VM: the clock goes on from ``elapsed`` seconds after
        ``start`` (the run time saved in the snapshot), before :meth:`start`."""
        self._carried = max(float(elapsed), 0.0)

    @property
    def elapsed(self) -> float:
        """Seconds the clock has run since :meth:`start` (0 before it), plus
        what :meth:`carry` carried over."""
        if self._started_at is None:
            return self._carried
        return self._carried + max(self._monotonic() - self._started_at, 0.0)

    def __call__(self) -> float:
        return self.start_time + self.elapsed
