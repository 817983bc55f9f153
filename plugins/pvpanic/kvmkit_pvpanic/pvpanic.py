"""The pvpanic register: the guest reads which events the device supports
and writes the event that happened (bit 0: panicked, bit 1: crash kernel
loaded)."""
from __future__ import annotations

from typing import Callable

PANICKED = 1 << 0
CRASH_LOADED = 1 << 1
SUPPORTED = PANICKED | CRASH_LOADED


class PvPanic:
    def __init__(self, on_event: Callable[[int], None]):
        self.on_event = on_event
        self.events_seen = 0

    def read(self, offset: int, size: int) -> int:
        return SUPPORTED if offset == 0 else 0

    def write(self, offset: int, size: int, value: int) -> None:
        event = value & SUPPORTED if offset == 0 else 0
        if event:
            self.events_seen |= event
            self.on_event(event)
