"""The core runtime's side of a queue engine, without a VM (re-exported by
kvmkit.testing): for tests and benchmarks of an engine such as
kvmkit-native's virtio-blk data path.

A device model reaches its runtime as ``self.host`` (see
kvmkit.virtio.runtime): ``wiring(i)``, ``offload(i, engine)``,
``release(i)``.  :class:`EngineHost` answers those with plain eventfds, so a
test plays the guest's notification (:meth:`kick`) and sees the interrupts
the engine raises (:meth:`interrupts`).

.. code-block:: python

    host = EngineHost()
    model.queue_backend, model.host = backend, host
    model.activate([queue], features)        # the model starts its engine
    host.kick()
    assert host.interrupts(wait=2) == 1
"""
from __future__ import annotations

import os
import select
import time

from .runtime import QueueWiring

__all__ = ["EngineHost"]


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class EngineHost:
    """A kick eventfd, an interrupt eventfd (MSI-X-like) and with ``intx`` a
    resample eventfd; ``index``: the only queue it wires (None: any)."""

    def __init__(self, *, intx: bool = False, index: int | None = None):
        self.kick_fd, self.irq_fd = _eventfd(), _eventfd()
        self.resample_fd = _eventfd() if intx else -1
        self.index = index
        self.engines: dict[int, object] = {}   # queue index -> engine, while offloaded
        self.released: list[int] = []

    @property
    def engine(self):
        """The engine of the one offloaded queue (None if there is none)."""
        return next(iter(self.engines.values()), None)

    # -- what a model calls ------------------------------------------------------------------
    def wiring(self, index: int) -> QueueWiring:
        if self.index is not None and index != self.index:
            raise ValueError(f"no wiring for queue {index}")
        return QueueWiring(self.kick_fd, self.irq_fd, self.resample_fd)

    def offload(self, index: int, engine) -> None:
        self.engines[index] = engine

    def release(self, index: int) -> None:
        self.released.append(index)
        self.engines.pop(index, None)

    # -- what the guest does ---------------------------------------------------------------------
    def kick(self) -> None:
        """Notify the queue, as the guest's write to the notify address does."""
        os.eventfd_write(self.kick_fd, 1)

    def interrupts(self, wait: float = 0.0) -> int:
        """How many interrupts the engine raised since the last call (0 after
        waiting ``wait`` seconds for one)."""
        if wait and not select.select([self.irq_fd], [], [], wait)[0]:
            return 0
        try:
            return os.eventfd_read(self.irq_fd)
        except BlockingIOError:
            return 0

    def run_batch(self, drv) -> float:
        """Kick for what ``drv`` (a DriverQueue, published) made available and
        sleep until the interrupts say all of it is used; returns the wall time
        from the kick."""
        target = drv.avail_idx
        drv.set_used_event((target - 1) & 0xFFFF)   # interrupt me when the batch is done
        t0 = time.perf_counter()
        self.kick()
        while drv.used_idx != target:
            if not self.interrupts(wait=10):
                raise RuntimeError("the engine did not complete the batch")
        return time.perf_counter() - t0

    def close(self) -> None:
        for fd in (self.kick_fd, self.irq_fd, self.resample_fd):
            if fd >= 0:
                os.close(fd)
