"""The virtio entropy device (virtio 1.2, section 5.4) as a pure state machine.

One queue, ``requestq``.  The driver makes device-writable buffers available;
the device fills them with random bytes from ``source`` and returns them.
At most ``max_bytes`` go into one request, so a guest that posts huge buffers
gets no more per notification than that.  There is no configuration space
and there are no feature bits.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

from kvmkit.plugin_api import VirtioDevice

__all__ = ["VirtioRng", "QUEUE_SIZE", "getrandom"]

QUEUE_SIZE = 64


def getrandom(n: int) -> bytes:
    """``n`` bytes from the host kernel's CSPRNG (``getrandom(2)``)."""
    out = bytearray()
    while len(out) < n:                      # a signal can cut a large request short
        out += os.getrandom(n - len(out))
    return bytes(out)


class VirtioRng(VirtioDevice):
    """A virtio-rng device filling each request with ``source(n)`` bytes."""

    device_id = 4                   # entropy source
    pci_class = 0x00FF00            # "unclassified device", as virtio-pci entropy devices report
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, max_bytes: int = 4096, source: Callable[[int], bytes] = getrandom,
                 log: logging.Logger | None = None):
        super().__init__()
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.source = source
        self.log = log or logging.getLogger(__name__)
        self.requests = 0               # requests served (for logs and tests)
        self.bytes_served = 0

    def process(self, index: int) -> None:
        queue = self.queues[index] if 0 <= index < len(self.queues) else None
        if queue is None:
            return
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:          # VirtqueueError goes to the transport
                queue.push(chain.head, self._fill(queue.memory, chain))
            if not queue.enable_notifications():
                return

    def _fill(self, memory, chain) -> int:
        """Write random bytes into the chain's writable buffers; return how many."""
        n = min(chain.writable_len, self.max_bytes)
        if n:
            data = self.source(n)[:n]
            chain.write(memory, 0, data)
            n = len(data)
        self.requests += 1
        self.bytes_served += n
        return n

    # -- snapshots (kvmkit.device_state) --------------------------------------------------
    # The core saves the transport and the queue; the model has only its
    # counters (every request is answered within process(), none is held).
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        return {"version": self.STATE_VERSION, "requests": self.requests,
                "bytes_served": self.bytes_served}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"virtio-rng state version {state.get('version')!r}; this plugin "
                             f"reads version {self.STATE_VERSION}")
        self.requests = int(state["requests"])
        self.bytes_served = int(state["bytes_served"])

    def close(self) -> None:
        self.log.info("served %d requests, %d bytes", self.requests, self.bytes_served)
