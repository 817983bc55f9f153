"""Log lines a guest can trigger, rate-limited (re-exported by kvmkit.plugin_api).

A guest decides how often a bad ring address, a broken queue, a BAR conflict
or an odd port write happens; logging each one lets it write tens of
thousands of lines a second into a detached VM's log.  :class:`GuestLog`
logs the first ``burst`` lines of each kind (its ``key``), then at most one
line per ``interval`` seconds that says how many were suppressed:

    log = GuestLog(logging.getLogger("kvmkit.device.x"))
    log.warning("bad-ring", "queue %d: bad ring address %#x", index, addr)

Keys are what the caller names (a fixed string per call site, or a small
bounded set such as a queue index), so the state stays small whatever the
guest does.  Thread-safe.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Hashable

__all__ = ["GuestLog", "BURST", "INTERVAL"]

BURST = 10              # lines of each kind logged in full
INTERVAL = 60.0         # then at most one summary line per kind this often (seconds)
MAX_KEYS = 256          # distinct kinds tracked; beyond that they share one budget


class _Kind:
    __slots__ = ("logged", "suppressed", "next_summary")

    def __init__(self) -> None:
        self.logged = 0
        self.suppressed = 0
        self.next_summary = 0.0


class GuestLog:
    """Rate-limited logging for events the guest causes (see the module doc)."""

    def __init__(self, logger: logging.Logger | str, burst: int = BURST,
                 interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic):
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.burst = burst
        self.interval = interval
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}
        self._lock = threading.Lock()

    def log(self, level: int, key: Hashable, msg: str, *args) -> bool:
        """Log ``msg % args`` unless kind ``key`` is over its budget; True if it was logged."""
        with self._lock:
            kind = self._kinds.get(key)
            if kind is None:
                if len(self._kinds) >= MAX_KEYS:
                    key = None                    # a caller with unbounded keys: one shared budget
                    kind = self._kinds.get(None)
                if kind is None:
                    kind = self._kinds[key] = _Kind()
            if kind.logged < self.burst:
                kind.logged += 1
                last = kind.logged == self.burst
                if last:
                    kind.next_summary = self._clock() + self.interval
                summary = 0
            else:
                kind.suppressed += 1
                now = self._clock()
                if now < kind.next_summary:
                    return False
                summary, kind.suppressed = kind.suppressed, 0
                kind.next_summary = now + self.interval
                last = False
        if summary:
            self.logger.log(level, msg + " (and %d more like it not logged since the last)",
                            *args, summary - 1)
        elif last:
            self.logger.log(level, msg + " (further ones: one line per %g s with a count)",
                            *args, self.interval)
        else:
            self.logger.log(level, msg, *args)
        return True

    def warning(self, key: Hashable, msg: str, *args) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def info(self, key: Hashable, msg: str, *args) -> bool:
        return self.log(logging.INFO, key, msg, *args)

    def suppressed(self) -> int:
        """Lines not logged yet (still waiting for their summary line)."""
        with self._lock:
            return sum(k.suppressed for k in self._kinds.values())
