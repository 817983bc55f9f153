"""The pure-Python split virtqueue, device side (virtio 1.2, section 2.7).

The guest (the driver) owns three structures in its RAM:

``descriptor table``  ``size`` entries of ``{addr u64, len u32, flags u16, next u16}``
``available ring``    ``{flags u16, idx u16, ring[size] u16, used_event u16}``
``used ring``         ``{flags u16, idx u16, ring[size] {id u32, len u32}, avail_event u16}``

:class:`SplitQueue` reads chains the driver made available and returns used
elements.  Everything it reads from guest memory is hostile: each descriptor
is copied out of guest RAM once and checked before anything is done with it,
and a chain that breaks the ring rules raises :class:`VirtqueueError`
without touching guest memory.  After that error the queue refuses further
``pop`` calls: the device is expected to enter DEVICE_NEEDS_RESET.

A device's notify handler typically runs::

    while True:
        queue.disable_notifications()
        while (chain := queue.pop()) is not None:
            ...                                  # serve it
            queue.push(chain.head, written)
        if not queue.enable_notifications():     # True: more arrived meanwhile
            break
    if queue.should_notify():
        ...                                      # interrupt the driver

Memory ordering: x86 is TSO, so stores through the memoryview become visible
in program order and loads are not reordered with other loads; that covers
"element before used.idx" and "avail.idx before the ring entry".  It does not
order a store before a later load (the store may still sit in the store
buffer), which matters in two places: publishing used.idx and then reading
the driver's used_event / avail.flags, and publishing avail_event (or
clearing NO_NOTIFY) and then re-reading avail.idx.  Without a full barrier
there, the device and the driver can each miss the other's update and a
notification is lost.  Python has no fence, so :func:`full_barrier` takes
and releases a lock, whose atomic read-modify-write is a full barrier on x86.
"""
from __future__ import annotations

import dataclasses
import struct
import threading

__all__ = [
    "VirtqueueError", "Chain", "SplitQueue", "full_barrier",
    "VIRTQ_DESC_F_NEXT", "VIRTQ_DESC_F_WRITE", "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_AVAIL_F_NO_INTERRUPT", "VIRTQ_USED_F_NO_NOTIFY", "MAX_QUEUE_SIZE",
    "desc_table_size", "avail_ring_size", "used_ring_size",
]

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
MAX_QUEUE_SIZE = 32768
MAX_CHAIN_BYTES = 1 << 32       # 2.7.5.2: no chain longer than 2^32 bytes

DESC_SIZE = 16
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def desc_table_size(size: int) -> int:
    return DESC_SIZE * size


def avail_ring_size(size: int) -> int:
    """flags, idx, ring[size], used_event."""
    return 6 + 2 * size


def used_ring_size(size: int) -> int:
    """flags, idx, ring[size] of 8-byte elements, avail_event."""
    return 6 + 8 * size


_barrier_lock = threading.Lock()


def full_barrier() -> None:
    """A full memory barrier (store->load ordering), see the module doc."""
    with _barrier_lock:
        pass


class VirtqueueError(Exception):
    """The driver broke the ring rules; the device must set DEVICE_NEEDS_RESET
    (or fail the request)."""


@dataclasses.dataclass
class Chain:
    """One descriptor chain the driver made available.

    Every ``(gpa, len)`` was checked to lie wholly inside guest RAM when the
    chain was popped; zero-length descriptors are left out.
    """

    head: int                          # descriptor index to return in the used ring
    readable: list[tuple[int, int]]    # (gpa, len) device-readable buffers, in order
    writable: list[tuple[int, int]]    # (gpa, len) device-writable buffers, in order
    readable_len: int = dataclasses.field(init=False)   # total bytes of each kind
    writable_len: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.readable_len = sum(n for _, n in self.readable)
        self.writable_len = sum(n for _, n in self.writable)

    @staticmethod
    def _spans(buffers, offset: int, length: int, total: int):
        """(gpa, len) pieces covering ``[offset, offset+length)`` of ``buffers``."""
        if offset < 0 or length < 0 or offset + length > total:
            raise ValueError(f"range {offset}+{length} runs past the chain's {total} bytes")
        for gpa, n in buffers:
            if length == 0:
                return
            if offset >= n:
                offset -= n
                continue
            take = min(n - offset, length)
            yield gpa + offset, take
            length -= take
            offset = 0

    def readable_views(self, mem, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Memoryviews of ``length`` readable bytes from ``offset`` (for pwritev)."""
        total = self.readable_len
        if length is None:
            length = max(total - offset, 0)
        return [mem.view(g, n) for g, n in self._spans(self.readable, offset, length, total)]

    def writable_views(self, mem, offset: int = 0, length: int | None = None) -> list[memoryview]:
        """Memoryviews of ``length`` writable bytes from ``offset`` (for preadv)."""
        total = self.writable_len
        if length is None:
            length = max(total - offset, 0)
        return [mem.view(g, n) for g, n in self._spans(self.writable, offset, length, total)]

    def read(self, mem, offset: int, n: int) -> bytes:
        """Gather ``n`` bytes of the readable buffers from ``offset`` (ValueError
        if the range runs past them)."""
        if self.readable and 0 <= offset and offset + n <= self.readable[0][1] and n >= 0:
            return mem.read(self.readable[0][0] + offset, n)       # the usual header read
        return b"".join(bytes(v) for v in self.readable_views(mem, offset, n))

    def write(self, mem, offset: int, data) -> None:
        """Scatter ``data`` into the writable buffers from ``offset`` (ValueError
        if it runs past them; nothing is written then)."""
        data = memoryview(data).cast("B")
        pos = 0
        for view in self.writable_views(mem, offset, len(data)):
            view[:] = data[pos:pos + len(view)]
            pos += len(view)


class SplitQueue:
    """The device side of one split virtqueue in guest memory.

    ``desc``, ``avail`` and ``used`` are the guest-physical addresses the
    driver wrote to the transport; ``event_idx`` and ``indirect`` say whether
    VIRTIO_F_RING_EVENT_IDX and VIRTIO_F_RING_INDIRECT_DESC were negotiated.
    """

    def __init__(self, memory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, indirect: bool):
        if not (1 <= size <= MAX_QUEUE_SIZE) or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        for name, addr, align in (("descriptor table", desc, 16), ("available ring", avail, 2),
                                  ("used ring", used, 4)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
        extents = (("descriptor table", desc, desc_table_size(size)),
                   ("available ring", avail, avail_ring_size(size)),
                   ("used ring", used, used_ring_size(size)))
        for name, addr, length in extents:
            if not memory.contains(addr, length):
                raise VirtqueueError(f"{name} {addr:#x}+{length:#x} is not inside guest RAM")
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.event_idx = event_idx
        self.indirect = indirect
        self._desc = memory.view(desc, desc_table_size(size))
        self._avail = memory.view(avail, avail_ring_size(size))
        self._used = memory.view(used, used_ring_size(size))
        self._used_event_off = 4 + 2 * size          # in the available ring
        self._avail_event_off = 4 + 8 * size         # in the used ring
        self.last_avail_idx = 0      # next available-ring slot the device reads (free-running u16)
        self._avail_idx = 0          # the driver's avail.idx as last read
        self.used_idx = 0            # next used-ring slot the device writes (free-running u16)
        self._signalled_used = 0     # used_idx when should_notify() last ran
        self._notifications = True
        self.broken: str | None = None

    # -- reading the available ring ----------------------------------------------------
    def _read_avail_idx(self) -> int:
        idx = _U16.unpack_from(self._avail, 2)[0]
        if (idx - self.last_avail_idx) & 0xFFFF > self.size:
            self._fail(f"avail.idx {idx} is more than {self.size} ahead of {self.last_avail_idx}")
        self._avail_idx = idx
        return idx

    def _fail(self, message: str):
        self.broken = message
        raise VirtqueueError(message)

    def has_available(self) -> bool:
        """Whether the driver has made chains available that pop() has not returned."""
        if self.broken:
            return False
        return _U16.unpack_from(self._avail, 2)[0] != self.last_avail_idx

    def pop(self) -> Chain | None:
        """The next available chain, or None.  Raises VirtqueueError for a
        chain (or ring state) that breaks the rules; the queue is then
        broken and every later pop raises too."""
        if self.broken:
            raise VirtqueueError(f"queue is broken ({self.broken}); the device needs a reset")
        if self._avail_idx == self.last_avail_idx and self._read_avail_idx() == self.last_avail_idx:
            if self.event_idx and self._notifications:
                # Ask for a kick at the next chain, then look again: a chain
                # added while avail_event was being written would otherwise be
                # left without a notification.
                self._write_avail_event()
                full_barrier()
                if self._read_avail_idx() == self.last_avail_idx:
                    return None
            else:
                return None
        slot = self.last_avail_idx % self.size
        head = _U16.unpack_from(self._avail, 4 + 2 * slot)[0]
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        try:
            chain = self._walk(head)
        except VirtqueueError as e:
            self.broken = str(e)
            raise
        if self.event_idx and self._notifications:
            self._write_avail_event()
        return chain

    def _walk(self, head: int) -> Chain:
        """Copy out and check the chain at ``head``.

        Limits (2.7.5.2, 2.7.5.3.1): at most ``size`` buffer descriptors in
        the whole chain, direct and indirect together; no more visits to a
        table than it has entries (which is how a loop shows); at most 2^32
        bytes in total.
        """
        if head >= self.size:
            raise VirtqueueError(f"head descriptor {head} is outside the {self.size}-entry table")
        mem = self.memory
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        table, table_len = self._desc, self.size
        index = head
        visits = 0              # descriptors read from the current table
        buffers = 0             # buffer descriptors in the chain (table pointers excluded)
        total = 0               # bytes
        in_indirect = False
        seen_writable = False
        while True:
            if index >= table_len:
                raise VirtqueueError(f"descriptor index {index} is outside the "
                                     f"{table_len}-entry {'indirect ' if in_indirect else ''}table")
            visits += 1
            if visits > table_len:
                raise VirtqueueError(f"chain from head {head} visits more descriptors than its "
                                     f"{table_len}-entry table holds (a loop)")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                if not self.indirect:
                    raise VirtqueueError("indirect descriptor, but VIRTIO_F_RING_INDIRECT_DESC "
                                         "was not negotiated")
                if in_indirect:
                    raise VirtqueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise VirtqueueError("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESC_SIZE:
                    raise VirtqueueError(f"indirect table length {length} is not a non-zero "
                                         f"multiple of {DESC_SIZE}")
                if not mem.contains(addr, length):
                    raise VirtqueueError(f"indirect table {addr:#x}+{length:#x} is not inside "
                                         "guest RAM")
                # The WRITE flag of the descriptor naming the table is ignored (2.7.5.3.2).
                table, table_len = mem.view(addr, length), length // DESC_SIZE
                index, visits, in_indirect = 0, 0, True
                continue
            buffers += 1
            if buffers > self.size:
                raise VirtqueueError(f"chain from head {head} is longer than the queue size "
                                     f"{self.size}")
            if flags & VIRTQ_DESC_F_WRITE:
                seen_writable = True
            elif seen_writable:
                raise VirtqueueError("device-readable descriptor after a device-writable one")
            if length:
                if not mem.contains(addr, length):
                    raise VirtqueueError(f"buffer {addr:#x}+{length:#x} is not inside guest RAM")
                total += length
                if total > MAX_CHAIN_BYTES:
                    raise VirtqueueError(f"chain from head {head} is longer than 2^32 bytes")
                (writable if flags & VIRTQ_DESC_F_WRITE else readable).append((addr, length))
            if not flags & VIRTQ_DESC_F_NEXT:
                return Chain(head, readable, writable)
            index = nxt

    # -- the used ring ----------------------------------------------------------------------
    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` to the driver with ``written`` bytes written
        into its writable buffers; the element is stored before used.idx."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor index of this queue")
        if not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written} does not fit the used element")
        slot = self.used_idx % self.size
        _USED_ELEM.pack_into(self._used, 4 + 8 * slot, head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        _U16.pack_into(self._used, 2, self.used_idx)

    def push_many(self, elements) -> None:
        """Return several ``(head, written)`` chains with one update of used.idx,
        so the driver sees all of them or none (virtio-net's mergeable receive
        buffers need that).  Nothing is written if one element is invalid."""
        elements = list(elements)
        for head, written in elements:
            if not 0 <= head < self.size:
                raise ValueError(f"head {head} is not a descriptor index of this queue")
            if not 0 <= written <= 0xFFFF_FFFF:
                raise ValueError(f"written length {written} does not fit the used element")
        idx = self.used_idx
        for head, written in elements:
            _USED_ELEM.pack_into(self._used, 4 + 8 * (idx % self.size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        _U16.pack_into(self._used, 2, idx)

    def should_notify(self) -> bool:
        """Whether the driver wants an interrupt for the elements pushed since
        the last call (used_event with EVENT_IDX, else avail.flags)."""
        old, new = self._signalled_used, self.used_idx
        self._signalled_used = new
        if old == new:
            return False
        full_barrier()                 # used.idx is visible before we read the driver's wish
        if self.event_idx:
            event = _U16.unpack_from(self._avail, self._used_event_off)[0]
            return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF
        flags = _U16.unpack_from(self._avail, 0)[0]
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- driver -> device notifications ----------------------------------------------
    def _write_avail_event(self) -> None:
        _U16.pack_into(self._used, self._avail_event_off, self.last_avail_idx)

    def disable_notifications(self) -> None:
        """Ask the driver not to kick: used.flags NO_NOTIFY; with EVENT_IDX
        avail_event is simply no longer advanced."""
        self._notifications = False
        if not self.event_idx:
            _U16.pack_into(self._used, 0, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask the driver to kick again (clear NO_NOTIFY, or with EVENT_IDX set
        avail_event to the next index to be read).  Returns True if chains
        are already available, which the caller must pop: their kick may have
        been suppressed."""
        self._notifications = True
        if self.event_idx:
            self._write_avail_event()
        else:
            _U16.pack_into(self._used, 0, 0)
        full_barrier()
        return self.has_available()

    # -- snapshots -------------------------------------------------------------------------
    def save_indices(self) -> dict:
        """The device side's ring bookkeeping, JSON-able (the rings themselves
        are guest memory): what :meth:`restore_indices` puts back on a queue
        built over the same rings."""
        return {"last_avail": self.last_avail_idx, "used": self.used_idx,
                "signalled_used": self._signalled_used, "notifications": self._notifications,
                "broken": self.broken}

    def restore_indices(self, state: dict) -> None:
        """Continue where :meth:`save_indices` left off.  avail.idx is read
        again from guest memory (and checked) at the next pop."""
        self.last_avail_idx = int(state["last_avail"]) & 0xFFFF
        self._avail_idx = self.last_avail_idx
        self.used_idx = int(state["used"]) & 0xFFFF
        self._signalled_used = int(state["signalled_used"]) & 0xFFFF
        self._notifications = bool(state["notifications"])
        self.broken = state.get("broken") or None

    def __repr__(self) -> str:
        return (f"SplitQueue(size={self.size}, desc={self.desc_addr:#x}, avail={self.avail_addr:#x}, "
                f"used={self.used_addr:#x}, last_avail={self.last_avail_idx}, used_idx={self.used_idx})")
