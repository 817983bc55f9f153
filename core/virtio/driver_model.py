"""The guest's side of a split virtqueue, for tests and benchmarks.

:class:`DriverQueue` lays out a descriptor table, available ring and used
ring in a :class:`~kvmkit.memory.GuestMemory` and behaves like a well-behaved
virtio driver: it adds chains (direct or through an indirect table), publishes
them, reads used elements back and honours the device's notification
suppression.  It can also write anything at all into the rings, for tests of
hostile input.  It knows nothing about the device side, so the same model
drives the pure-Python :class:`~kvmkit.virtio.queue.SplitQueue` and any other
queue backend.

.. code-block:: python

    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    alloc = GuestAllocator(mem, 0x1000)
    drv = DriverQueue(mem, 16, alloc)
    out = alloc.put(b"request"); status = alloc.alloc(1)
    head = drv.add([(out, 7)], [(status, 1)])
    drv.kick()
    q = SplitQueue(mem, 16, *drv.addresses, event_idx=False, indirect=False)
    chain = q.pop(); q.push(chain.head, 1)
    assert drv.used() == [(head, 1)]
"""
from __future__ import annotations

import collections
import struct
from typing import Sequence

from .queue import (DESC_SIZE, VIRTQ_AVAIL_F_NO_INTERRUPT, VIRTQ_DESC_F_INDIRECT,
                    VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_USED_F_NO_NOTIFY,
                    avail_ring_size, desc_table_size, used_ring_size)

__all__ = ["GuestAllocator", "DriverQueue", "DriverError", "Buffer"]

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")

Buffer = tuple[int, int]        # (gpa, length)


class DriverError(Exception):
    """The model was asked for something a driver cannot do (ring full...)."""


class GuestAllocator:
    """A bump allocator over ``[start, end)`` of guest memory."""

    def __init__(self, memory, start: int, end: int | None = None):
        self.memory = memory
        self.start = start
        self.end = memory.size if end is None else end
        self.next = start

    def alloc(self, length: int, align: int = 16) -> int:
        """Reserve ``length`` bytes aligned to ``align``; returns the gpa."""
        gpa = -(-self.next // align) * align
        if gpa + length > self.end:
            raise DriverError(f"guest allocator exhausted ({length} bytes wanted at {gpa:#x})")
        self.next = gpa + length
        return gpa

    def put(self, data: bytes, align: int = 16) -> int:
        """Allocate and fill a buffer; returns its gpa."""
        gpa = self.alloc(len(data), align)
        self.memory.write(gpa, data)
        return gpa

    def chain_buffers(self, readable, writable):
        """Buffers for one chain: each byte string of ``readable`` copied in,
        a buffer of each length of ``writable`` filled with 0xEE (so what the
        device did not write shows); two lists of (gpa, length)."""
        rd = [(self.put(bytes(data)), len(data)) for data in readable]
        wr = [(self.put(b"\xee" * length), length) for length in writable]
        return rd, wr

    def reset(self, to: int | None = None) -> None:
        self.next = self.start if to is None else to


class DriverQueue:
    """A split virtqueue as a driver sees it.

    The rings are allocated from ``allocator`` (page-aligned descriptor
    table); with ``indirect_max`` > 0 each descriptor slot also gets an
    indirect table of that many entries, used by ``add(..., indirect=True)``.
    """

    def __init__(self, memory, size: int, allocator: GuestAllocator, *,
                 indirect_max: int = 0, event_idx: bool = False):
        self.memory = memory
        self.size = size
        self.event_idx = event_idx           # the device negotiated VIRTIO_F_RING_EVENT_IDX
        self.desc = allocator.alloc(desc_table_size(size), 4096)
        self.avail = allocator.alloc(avail_ring_size(size), 2)
        self.used_ring = allocator.alloc(used_ring_size(size), 4)
        for gpa, n in ((self.desc, desc_table_size(size)), (self.avail, avail_ring_size(size)),
                       (self.used_ring, used_ring_size(size))):
            memory.write(gpa, bytes(n))
        self.indirect_max = indirect_max
        self.indirect_area = (allocator.alloc(size * indirect_max * DESC_SIZE, 16)
                              if indirect_max else 0)
        self.free = collections.deque(range(size))   # free descriptor indices
        self.chains: dict[int, list[int]] = {}   # head -> descriptor indices it holds
        self.avail_idx = 0                   # next avail slot (free-running u16)
        self.last_used_idx = 0               # next used slot to read
        self._kicked_idx = 0                 # avail_idx at the last kick()

    @property
    def addresses(self) -> tuple[int, int, int]:
        """(desc, avail, used) guest-physical addresses, as the transport learns them."""
        return self.desc, self.avail, self.used_ring

    # -- raw access (also for hostile tests) ----------------------------------------------
    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor ``index`` of the ring's table (or of the table at ``table``)."""
        base = self.desc if table is None else table
        self.memory.write(base + DESC_SIZE * index, _DESC.pack(addr, length, flags, next))

    def read_desc(self, index: int) -> tuple[int, int, int, int]:
        return _DESC.unpack(self.memory.read(self.desc + DESC_SIZE * index, DESC_SIZE))

    def write_avail_entry(self, slot: int, head: int) -> None:
        self.memory.write(self.avail + 4 + 2 * (slot % self.size), _U16.pack(head))

    def set_avail_idx(self, idx: int) -> None:
        self.memory.write(self.avail + 2, _U16.pack(idx & 0xFFFF))

    def submit_head(self, head: int) -> None:
        """Put ``head`` (any value) in the next available slot and publish it."""
        self.write_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    @property
    def used_idx(self) -> int:
        """used.idx as the device published it."""
        return _U16.unpack(self.memory.read(self.used_ring + 2, 2))[0]

    @property
    def used_flags(self) -> int:
        return _U16.unpack(self.memory.read(self.used_ring, 2))[0]

    @property
    def avail_event(self) -> int:
        return _U16.unpack(self.memory.read(self.used_ring + 4 + 8 * self.size, 2))[0]

    # -- interrupt suppression (driver -> device wishes) ------------------------------
    def set_no_interrupt(self, on: bool) -> None:
        """avail.flags VIRTQ_AVAIL_F_NO_INTERRUPT (used without EVENT_IDX)."""
        self.memory.write(self.avail, _U16.pack(VIRTQ_AVAIL_F_NO_INTERRUPT if on else 0))

    def set_used_event(self, idx: int) -> None:
        """used_event (EVENT_IDX): interrupt me once used.idx passes ``idx``."""
        self.memory.write(self.avail + 4 + 2 * self.size, _U16.pack(idx & 0xFFFF))

    # -- adding chains -------------------------------------------------------------------
    def add(self, readable: Sequence[Buffer] = (), writable: Sequence[Buffer] = (), *,
            indirect: bool = False, publish: bool = True) -> int:
        """Add a chain of ``readable`` then ``writable`` buffers; returns its head.

        With ``indirect`` the buffers go into the head slot's indirect table and
        the ring holds one descriptor naming it.  With ``publish`` (default)
        avail.idx is updated at once; otherwise call :meth:`publish`.
        """
        bufs = [(g, n, 0) for g, n in readable] + [(g, n, VIRTQ_DESC_F_WRITE) for g, n in writable]
        if not bufs:
            raise DriverError("a chain needs at least one buffer")
        if indirect:
            if len(bufs) > self.indirect_max:
                raise DriverError(f"{len(bufs)} buffers do not fit an indirect table of "
                                  f"{self.indirect_max}")
            if not self.free:
                raise DriverError("no free descriptors")
            head = self.free.popleft()
            table = self.indirect_area + head * self.indirect_max * DESC_SIZE
            for i, (g, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(i, g, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else i + 1, table=table)
            self.write_desc(head, table, len(bufs) * DESC_SIZE, VIRTQ_DESC_F_INDIRECT)
            self.chains[head] = [head]
        else:
            if len(bufs) > len(self.free):
                raise DriverError(f"{len(bufs)} descriptors wanted, {len(self.free)} free")
            idx = [self.free.popleft() for _ in bufs]
            for i, (g, n, f) in enumerate(bufs):
                last = i == len(bufs) - 1
                self.write_desc(idx[i], g, n, f | (0 if last else VIRTQ_DESC_F_NEXT),
                                0 if last else idx[i + 1])
            head = idx[0]
            self.chains[head] = idx
        self.write_avail_entry(self.avail_idx, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()
        return head

    def publish(self) -> None:
        """Write avail.idx so the device sees every chain added so far."""
        self.set_avail_idx(self.avail_idx)

    def kick(self) -> bool:
        """Publish, and say whether the device asked to be notified of the chains
        added since the last kick (avail_event with ``event_idx``, else used.flags)."""
        self.publish()
        old, new = self._kicked_idx, self.avail_idx
        self._kicked_idx = new
        if old == new:
            return False
        return self.needs_kick(old, new)

    def needs_kick(self, old: int, new: int) -> bool:
        """Whether moving avail.idx from ``old`` to ``new`` calls for a notification."""
        if self.event_idx:
            event = self.avail_event
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self.used_flags & VIRTQ_USED_F_NO_NOTIFY

    # -- used elements --------------------------------------------------------------------
    def used(self) -> list[tuple[int, int]]:
        """The ``(head, written)`` elements the device returned since the last
        call, in order; their descriptors become free again."""
        out = []
        end = self.used_idx
        while self.last_used_idx != end:
            slot = self.last_used_idx % self.size
            head, written = _USED_ELEM.unpack(
                self.memory.read(self.used_ring + 4 + 8 * slot, 8))
            out.append((head, written))
            self.free.extend(self.chains.pop(head, []))
            self.last_used_idx = (self.last_used_idx + 1) & 0xFFFF
        return out

    @property
    def in_flight(self) -> int:
        """How many chains the device has not returned yet."""
        return len(self.chains)
