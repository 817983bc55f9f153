"""Port-I/O and MMIO buses: sorted range tables looked up with bisect.

Each range belongs to a device; the device's lock is held around every call
into its handler, so device code is never entered by two threads at once.
An access no range claims goes to the ``miss`` callback (the
``kvmkit_unhandled_io`` hook); if that declines, reads return all-ones and
the first access to each address is logged, rate-limited: a guest touching
ever new addresses gets a summary line with a count, and the set of
addresses remembered stays below ``MISSED_LIMIT``.
"""
from __future__ import annotations

import bisect
import logging
import threading
from typing import Callable

from .guest_log import GuestLog

log = logging.getLogger("kvmkit.bus")

MISSED_LIMIT = 1024      # unclaimed addresses remembered (to log each once) per bus
MISSED_BURST = 64        # unclaimed-access lines logged in full per bus, then counted


class BusConflict(Exception):
    """Two devices claim overlapping ranges."""


class DeviceFault(Exception):
    """A device raised while handling an access; carries the device's name."""

    def __init__(self, device: str, error: BaseException):
        super().__init__(f"device {device} failed: {type(error).__name__}: {error}")
        self.device = device
        self.error = error


class Range:
    __slots__ = ("base", "size", "end", "handler", "lock", "owner")

    def __init__(self, base: int, size: int, handler, lock, owner: str):
        self.base, self.size, self.end = base, size, base + size
        self.handler, self.lock, self.owner = handler, lock, owner


_MAX_HITS = 4096          # addresses cached per table (a guest may touch a whole BAR)

MissHandler = Callable[[str, int, int, bool, int], "int | None"]


class Bus:
    def __init__(self, space: str, miss: MissHandler | None = None):
        self.space = space
        # (bases, ranges, hits), replaced whole on every change: lookups on
        # vCPU threads never see a half-updated table while a BAR moves.
        # ``hits`` caches address -> Range for this table only (one dict
        # lookup per access instead of a bisect), so a lookup that raced a
        # change can only fill the cache of a table nobody uses any more.
        self._table: tuple[tuple[int, ...], tuple[Range, ...], dict] = ((), (), {})
        self._change_lock = threading.Lock()
        self._miss = miss
        self._missed: set[int] = set()
        self._missed_lock = threading.Lock()
        self._miss_log = GuestLog(log, burst=MISSED_BURST)

    def add(self, base: int, size: int, handler, lock, owner: str) -> None:
        if size <= 0 or base < 0:
            raise BusConflict(f"{owner}: bad {self.space} range {base:#x}+{size:#x}")
        with self._change_lock:
            bases, ranges, _ = self._table
            i = bisect.bisect_right(bases, base)
            for neighbour in ranges[max(i - 1, 0):i + 1]:
                if base < neighbour.end and neighbour.base < base + size:
                    raise BusConflict(
                        f"{owner}: {self.space} range {base:#x}-{base + size - 1:#x} overlaps "
                        f"{neighbour.owner} at {neighbour.base:#x}-{neighbour.end - 1:#x}")
            self._table = (bases[:i] + (base,) + bases[i:],
                           ranges[:i] + (Range(base, size, handler, lock, owner),) + ranges[i:], {})

    def remove(self, base: int, owner: str) -> None:
        """Drop the range at ``base`` that ``owner`` added (a BAR the guest moved)."""
        with self._change_lock:
            bases, ranges, _ = self._table
            i = bisect.bisect_left(bases, base)
            if i < len(ranges) and ranges[i].base == base and ranges[i].owner == owner:
                self._table = (bases[:i] + bases[i + 1:], ranges[:i] + ranges[i + 1:], {})
                return
        raise KeyError(f"{owner} has no {self.space} range at {base:#x}")

    def find(self, addr: int) -> Range | None:
        bases, ranges, _ = self._table
        i = bisect.bisect_right(bases, addr) - 1
        if i >= 0:
            r = ranges[i]
            if addr < r.end:
                return r
        return None

    def ranges(self) -> list[Range]:
        return list(self._table[1])

    # -- dispatch ------------------------------------------------------------------
    def _claimed(self, addr: int, size: int) -> Range | None:
        """The range that holds all of ``addr``..``addr + size - 1``, or None."""
        table = self._table
        hits = table[2]
        r = hits.get(addr)
        if r is None:
            r = self.find(addr)                  # on the current table
            if r is None:
                return None
            if table is self._table and len(hits) < _MAX_HITS:
                hits[addr] = r
        return r if addr + size <= r.end else None

    def read(self, addr: int, size: int) -> int:
        r = self._table[2].get(addr)             # the common case, inline: a cached address
        if r is None or addr + size > r.end:
            r = self._claimed(addr, size)
        if r is None:
            return self._unclaimed(addr, size, False, 0)
        try:
            with r.lock:
                value = r.handler.read(addr - r.base, size)
        except Exception as e:
            raise DeviceFault(r.owner, e) from e
        return value & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        r = self._table[2].get(addr)
        if r is None or addr + size > r.end:
            r = self._claimed(addr, size)
        if r is None:
            self._unclaimed(addr, size, True, value)
            return
        try:
            with r.lock:
                r.handler.write(addr - r.base, size, value)
        except Exception as e:
            raise DeviceFault(r.owner, e) from e

    def _unclaimed(self, addr: int, size: int, is_write: bool, value: int) -> int:
        if self._miss is not None:
            result = self._miss(self.space, addr, size, is_write, value)
            if result is not None:
                return 0 if is_write else int(result) & ((1 << (8 * size)) - 1)
        if addr not in self._missed:
            with self._missed_lock:
                if addr in self._missed:
                    return (1 << (8 * size)) - 1
                if len(self._missed) < MISSED_LIMIT:
                    self._missed.add(addr)
            self._miss_log.info("unclaimed", "unclaimed %s %s at %#x (size %d)%s; ignoring further "
                                "accesses", self.space, "write" if is_write else "read", addr, size,
                                f" value {value:#x}" if is_write else "")
        return (1 << (8 * size)) - 1
