"""A whole virtio driver for tests: the guest's side of a :class:`VirtioDevice`.

:class:`VirtioTestDriver` does what a guest driver and the virtio-pci
transport do between them, without PCI: it negotiates features, lays out
every queue in guest memory (:class:`~kvmkit.virtio.driver_model.DriverQueue`),
hands the device its :class:`~kvmkit.virtio.queue.SplitQueue`\\ s through
``activate``, puts requests in guest buffers, notifies the device (calls
``process`` under the device's lock, as the transport's worker does) and
reads back the used elements and what the device wrote.

.. code-block:: python

    drv = VirtioTestDriver(MyDevice(), memory)
    req = drv.submit(0, readable=[b"request"], writable=[64])
    assert drv.notify(0) == [(req.head, 64)]
    assert drv.written(req) == b"..."
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Sequence

from .virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                            VIRTIO_F_VERSION_1, VirtioDevice)
from .virtio.driver_model import DriverQueue, GuestAllocator
from .virtio.queue import SplitQueue

__all__ = ["VirtioTestDriver", "Request"]

RING_AREA = 0x1000                  # rings live in [RING_AREA, buffers_at)


@dataclasses.dataclass
class Request:
    """One chain the driver made available."""

    queue: int
    head: int
    readable: list[tuple[int, int]]          # (gpa, length) in chain order
    writable: list[tuple[int, int]]


class VirtioTestDriver:
    """Drive ``device`` as a guest would, in ``memory`` (a GuestMemory).

    Features: everything the device offers plus VERSION_1; EVENT_IDX and
    INDIRECT_DESC only when asked for (``event_idx``, ``indirect``), or
    exactly ``features`` when given.  ``queue_sizes`` (default: the device's
    maximum sizes) are the sizes the driver picks.  ``lock`` is held around
    every call into the device (the device context's lock in a VM).
    """

    def __init__(self, device: VirtioDevice, memory, *, features: int | None = None,
                 event_idx: bool = False, indirect: bool = False,
                 queue_sizes: Sequence[int] | None = None, buffers_at: int | None = None,
                 lock=None):
        self.device = device
        self.memory = memory
        self.lock = lock if lock is not None else threading.RLock()
        sizes = list(queue_sizes if queue_sizes is not None else device.queue_sizes)
        if len(sizes) != len(device.queue_sizes):
            raise ValueError(f"the device has {len(device.queue_sizes)} queues, not {len(sizes)}")
        for i, (size, most) in enumerate(zip(sizes, device.queue_sizes)):
            if size > most:
                raise ValueError(f"queue {i}: size {size} is above the device's maximum {most}")
        if buffers_at is None:
            buffers_at = min(memory.size // 2, 1 << 20)
        if features is None:
            features = device.features | (1 << VIRTIO_F_VERSION_1)
            features |= (1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0
            features |= (1 << VIRTIO_F_RING_INDIRECT_DESC) if indirect else 0
        self.features = features
        event_idx = bool(features >> VIRTIO_F_RING_EVENT_IDX & 1)
        indirect = bool(features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        rings = GuestAllocator(memory, RING_AREA, buffers_at)
        self.buffers = GuestAllocator(memory, buffers_at)
        self.queues = [DriverQueue(memory, size, rings, indirect_max=16 if indirect else 0,
                                   event_idx=event_idx) for size in sizes]
        self.device_queues = [SplitQueue(memory, size, *q.addresses, event_idx=event_idx,
                                         indirect=indirect) for size, q in zip(sizes, self.queues)]
        with self.lock:
            device.activate(list(self.device_queues), features)

    # -- requests -----------------------------------------------------------------------
    def submit(self, queue: int, readable: Sequence[bytes] = (), writable: Sequence[int] = (),
               *, indirect: bool = False) -> Request:
        """Put ``readable`` byte strings and ``writable`` buffers of the given
        lengths (filled with 0xEE) in guest memory and make them available as
        one chain on ``queue``; the device is not notified yet."""
        rd, wr = self.buffers.chain_buffers(readable, writable)
        head = self.queues[queue].add(rd, wr, indirect=indirect)
        return Request(queue, head, rd, wr)

    def notify(self, queue: int) -> list[tuple[int, int]]:
        """Kick ``queue``: the device's ``process`` runs (under the lock);
        returns the ``(head, written)`` used elements it pushed."""
        with self.lock:
            self.device.process(queue)
        used = self.queues[queue].used()
        if not any(q.in_flight for q in self.queues):
            self.buffers.reset()                   # nothing in flight: reuse the buffer area
        return used

    def written(self, request: Request, length: int | None = None) -> bytes:
        """The first ``length`` bytes (default: all) of the request's writable buffers."""
        data = b"".join(self.memory.read(gpa, n) for gpa, n in request.writable)
        return data if length is None else data[:length]

    def request(self, queue: int, readable: Sequence[bytes] = (), writable: Sequence[int] = (),
                **kw) -> tuple[int, bytes]:
        """Submit one chain, notify, and return ``(written, data written)``;
        AssertionError if the device did not complete exactly that chain."""
        req = self.submit(queue, readable, writable, **kw)
        used = self.notify(queue)
        if [head for head, _ in used] != [req.head]:
            raise AssertionError(f"queue {queue}: expected chain {req.head} back, got {used}")
        written = used[0][1]
        return written, self.written(req, written)   # the area is recycled only by later submits

    # -- configuration ----------------------------------------------------------------------
    def config(self, offset: int, size: int) -> int:
        """Read the device-specific configuration space."""
        with self.lock:
            return self.device.config_read(offset, size)

    def reset(self) -> None:
        """The driver resets the device."""
        with self.lock:
            self.device.reset()
