"""The core runtime's side of a native queue engine, for the benchmarks.

:class:`EngineHost` hands a device model the eventfds an engine runs a queue
with (as kvmkit.virtio.runtime does in a VM) and plays the guest's
notification and interrupt around one batch of requests.
"""
from __future__ import annotations

import os
import select
import time

from kvmkit.virtio.runtime import QueueWiring


class EngineHost:
    """A kick eventfd and an MSI-X-like interrupt eventfd; records the offload."""

    def __init__(self):
        self.kick_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.irq_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.engine = None

    def wiring(self, index):
        return QueueWiring(self.kick_fd, self.irq_fd, -1, True)

    def offload(self, index, engine):
        self.engine = engine

    def release(self, index):
        self.engine = None

    def run_batch(self, drv) -> float:
        """Kick the engine for what ``drv`` (a DriverQueue, already published)
        made available and sleep until its interrupt says all of it is used;
        returns the wall time from the kick."""
        target = drv.avail_idx
        drv.set_used_event((target - 1) & 0xFFFF)   # interrupt me when the batch is done
        t0 = time.perf_counter()
        os.eventfd_write(self.kick_fd, 1)          # the guest's notification
        while drv.used_idx != target:
            if not select.select([self.irq_fd], [], [], 10)[0]:
                raise RuntimeError("the native engine did not complete the batch")
            os.eventfd_read(self.irq_fd)
        return time.perf_counter() - t0

    def close(self):
        os.close(self.kick_fd)
        os.close(self.irq_fd)
