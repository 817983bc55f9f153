"""The split virtqueue in C (src/vq.c) behind SplitQueue's Python API.

:class:`NativeSplitQueue` takes the same arguments, raises the same errors
with the same messages and leaves guest memory in the same state as
:class:`kvmkit.virtio.queue.SplitQueue`; tests/unit/test_virtqueue.py and
native/tests/test_vq_differential.py run both.  The C structures are exposed
for C code that drives the queue itself (the virtio-blk engine): ``kvq``
(``struct kvq *``), ``mem`` (``struct kvq_mem *``) and ``chain`` (a scratch
``struct kvq_chain`` whose ``bufs`` holds ``size`` entries).
"""
from __future__ import annotations

import struct

from kvmkit.plugin_api import Chain, VirtqueueError

from kvmkit_native._native import ffi, lib

__all__ = ["NativeSplitQueue"]

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = (1 << 64) - 1
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")
# struct kvq_buf as (gpa, len): u64 gpa, u32 len, padding, the host pointer.
_BUF = struct.Struct("<QI4x8x")
assert ffi.sizeof("struct kvq_buf") == _BUF.size


def chain_from(c) -> Chain:
    """A kvmkit Chain from a C ``struct kvq_chain`` (its buffers read as bytes:
    faster than field by field through cffi)."""
    nread = c.nread
    bufs = list(_BUF.iter_unpack(ffi.buffer(c.bufs, _BUF.size * (nread + c.nwrite))))
    return Chain(c.head, bufs[:nread], bufs[nread:])


class NativeSplitQueue:
    """The device side of one split virtqueue, in C; see SplitQueue."""

    def __init__(self, memory, size: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, indirect: bool):
        if not (0 <= size <= _U32_MAX and all(0 <= a <= _U64_MAX for a in (desc, avail, used))):
            # Beyond the C types: the Python queue refuses these with the same checks.
            from kvmkit.virtio.queue import SplitQueue
            SplitQueue(memory, size, desc, avail, used, event_idx=event_idx, indirect=indirect)
            raise AssertionError("SplitQueue accepted arguments outside the C types")
        if len(memory.regions) > lib.KVQ_MAX_REGIONS:
            raise ValueError(f"{len(memory.regions)} RAM regions; the C queue takes "
                             f"{lib.KVQ_MAX_REGIONS}")
        # The buffer stays exported (so mapped) while this cdata lives, like SplitQueue's views.
        self._host = ffi.from_buffer("uint8_t[]", memory.host_buffer(), require_writable=True)
        self.mem = ffi.new("struct kvq_mem *")
        self.mem.count = len(memory.regions)
        for i, r in enumerate(memory.regions):
            if r.offset + r.size > len(self._host):
                raise ValueError(f"RAM region {r} lies outside the host buffer")
            self.mem.regions[i].gpa = r.gpa
            self.mem.regions[i].size = r.size
            self.mem.regions[i].hva = self._host + r.offset
            if (int(ffi.cast("uintptr_t", self.mem.regions[i].hva)) - r.gpa) % 8:
                raise ValueError(f"RAM region {r} is not mapped 8-byte aligned like its address")
        self.kvq = ffi.new("struct kvq *")
        if lib.kvq_init(self.kvq, self.mem, size, desc, avail, used,
                        bool(event_idx), bool(indirect)) < 0:
            raise VirtqueueError(self._error())
        self._bufs = ffi.new("struct kvq_buf[]", size)
        self.chain = ffi.new("struct kvq_chain *")
        self.chain.bufs = self._bufs
        self.memory = memory
        self.size = size
        self.desc_addr, self.avail_addr, self.used_addr = desc, avail, used
        self.event_idx = event_idx
        self.indirect = indirect

    def _error(self) -> str:
        return ffi.string(self.kvq.error).decode("utf-8", "replace")

    # -- state, read from the C struct ----------------------------------------------------
    @property
    def last_avail_idx(self) -> int:
        """Next available-ring slot the device reads (free-running u16)."""
        return self.kvq.last_avail_idx

    @last_avail_idx.setter
    def last_avail_idx(self, value: int) -> None:
        self.kvq.last_avail_idx = value & 0xFFFF

    @property
    def used_idx(self) -> int:
        """Next used-ring slot the device writes (free-running u16)."""
        return self.kvq.used_idx

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self.kvq.used_idx = value & 0xFFFF

    @property
    def broken(self) -> str | None:
        """None, or why the queue stopped (it then needs a device reset)."""
        return self._error() if self.kvq.broken else None

    # -- the rings ------------------------------------------------------------------------
    def has_available(self) -> bool:
        return bool(lib.kvq_has_available(self.kvq))

    def pop(self) -> Chain | None:
        """The next available chain, or None; VirtqueueError (and the queue
        stays broken) for a chain or ring state that breaks the rules."""
        if self.kvq.broken:
            raise VirtqueueError(f"queue is broken ({self._error()}); the device needs a reset")
        got = lib.kvq_pop(self.kvq, self.chain)
        if got == 0:
            return None
        if got < 0:
            raise VirtqueueError(self._error())
        return chain_from(self.chain)

    def push(self, head: int, written: int) -> None:
        """Return chain ``head`` with ``written`` bytes written into its writable buffers."""
        if not 0 <= head < self.size:
            raise ValueError(f"head {head} is not a descriptor index of this queue")
        if not 0 <= written <= _U32_MAX:
            raise ValueError(f"written length {written} does not fit the used element")
        lib.kvq_push(self.kvq, head, written)

    def push_many(self, elements) -> None:
        """Return several ``(head, written)`` chains with one update of used.idx
        (the driver sees all of them or none); nothing is written if one
        element is invalid."""
        elements = list(elements)
        for head, written in elements:
            if not 0 <= head < self.size:
                raise ValueError(f"head {head} is not a descriptor index of this queue")
            if not 0 <= written <= _U32_MAX:
                raise ValueError(f"written length {written} does not fit the used element")
        ring = ffi.buffer(self.kvq.used, 4 + 8 * self.size)
        if not elements:                   # SplitQueue rewrites used.idx all the same
            _U16.pack_into(ring, 2, self.kvq.used_idx)
            return
        # All but the last element go into the ring unpublished; kvq_push then
        # writes the last one and publishes the lot with its release store.
        idx = self.kvq.used_idx
        for head, written in elements[:-1]:
            _USED_ELEM.pack_into(ring, 4 + 8 * (idx % self.size), head, written)
            idx = (idx + 1) & 0xFFFF
        self.kvq.used_idx = idx
        lib.kvq_push(self.kvq, *elements[-1])

    def should_notify(self) -> bool:
        return bool(lib.kvq_should_notify(self.kvq))

    def disable_notifications(self) -> None:
        lib.kvq_disable_notifications(self.kvq)

    def enable_notifications(self) -> bool:
        return bool(lib.kvq_enable_notifications(self.kvq))

    # -- snapshots -------------------------------------------------------------------------
    def save_indices(self) -> dict:
        """As SplitQueue.save_indices (same keys): read from the C struct.
        Call only while no engine thread runs the queue (paused or stopped)."""
        q = self.kvq
        return {"last_avail": q.last_avail_idx, "used": q.used_idx,
                "signalled_used": q.signalled_used, "notifications": bool(q.notifications),
                "broken": self._error() if q.broken else None}

    def restore_indices(self, state: dict) -> None:
        """As SplitQueue.restore_indices: before an engine starts on the queue."""
        q = self.kvq
        q.last_avail_idx = int(state["last_avail"]) & 0xFFFF
        q.avail_idx = q.last_avail_idx             # read avail.idx again at the next pop
        q.used_idx = int(state["used"]) & 0xFFFF
        q.signalled_used = int(state["signalled_used"]) & 0xFFFF
        q.notifications = int(bool(state["notifications"]))
        broken = state.get("broken")
        q.broken = int(bool(broken))
        if broken:
            msg = str(broken).encode("utf-8", "replace")[:lib.KVQ_ERROR_LEN - 1]
            ffi.memmove(q.error, msg + b"\0", len(msg) + 1)

    def __repr__(self) -> str:
        return (f"NativeSplitQueue(size={self.size}, desc={self.desc_addr:#x}, "
                f"avail={self.avail_addr:#x}, used={self.used_addr:#x}, "
                f"last_avail={self.last_avail_idx}, used_idx={self.used_idx})")
