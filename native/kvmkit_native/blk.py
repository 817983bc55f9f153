"""virtio-blk's data path on a C thread (src/blk.c), as the model sees it.

:class:`BlkEngine` owns a :class:`~kvmkit_native.queue.NativeSplitQueue`
from start to stop: the thread pops, serves IN/OUT/FLUSH with
preadv/pwritev/fdatasync and interrupts by itself.  Requests it leaves to
Python (GET_ID, DISCARD, WRITE_ZEROES, unknown types, buffers O_DIRECT cannot
take) come back through :meth:`service`, which the core's worker calls with
the device lock held when ``event_fd`` is readable: each goes to
``on_request(chain) -> written`` and is then completed in C.
"""
from __future__ import annotations

from typing import Callable

from kvmkit.plugin_api import Chain, VirtqueueError

from ._native import ffi, lib
from .queue import NativeSplitQueue

__all__ = ["BlkEngine"]

_BATCH = 64
_ERR = 256


def chain_of(c) -> Chain:
    """A kvmkit Chain from a C ``struct kvq_chain``."""
    bufs = c.bufs
    nread = c.nread
    readable = [(bufs[i].gpa, bufs[i].len) for i in range(nread)]
    writable = [(bufs[i].gpa, bufs[i].len) for i in range(nread, nread + c.nwrite)]
    return Chain(c.head, readable, writable)


class BlkEngine:
    def __init__(self, queue: NativeSplitQueue, *, image_fd: int, capacity: int, readonly: bool,
                 writethrough: bool, direct_align: int, kick_fd: int, irq_fd: int,
                 resample_fd: int, on_request: Callable[[Chain], int]):
        self.queue = queue                       # the engine's kvq lives in it
        self.on_request = on_request
        config = ffi.new("struct kvblk_config *", {
            "image_fd": image_fd, "capacity": capacity, "readonly": int(readonly),
            "writethrough": int(writethrough), "direct_align": direct_align,
            "kick_fd": kick_fd, "irq_fd": irq_fd, "resample_fd": resample_fd})
        err = ffi.new("char[]", _ERR)
        engine = lib.kvblk_start(queue.kvq, config, err, _ERR)
        if engine == ffi.NULL:
            raise OSError(ffi.string(err).decode(errors="replace"))
        self._engine = engine
        self._chains = ffi.new("struct kvq_chain[]", _BATCH)
        self.event_fd = lib.kvblk_event_fd(engine)

    def service(self) -> None:
        """Serve the requests handed to Python; raise VirtqueueError once the queue broke."""
        while True:
            n = lib.kvblk_take_deferred(self._engine, self._chains, _BATCH)
            for i in range(n):
                chain = chain_of(self._chains[i])
                lib.kvblk_complete(self._engine, chain.head, self.on_request(chain))
            if n < _BATCH:
                break
        msg = ffi.new("char[]", _ERR)
        if lib.kvblk_broken(self._engine, msg, _ERR):
            raise VirtqueueError(ffi.string(msg).decode(errors="replace"))

    def pause(self) -> None:
        lib.kvblk_pause(self._engine)

    def resume(self) -> None:
        lib.kvblk_resume(self._engine)

    def set_masked(self, masked: bool) -> None:
        lib.kvblk_set_masked(self._engine, int(masked))

    def take_isr(self) -> int:
        return lib.kvblk_take_isr(self._engine)

    def stats(self) -> dict[str, int]:
        s = ffi.new("struct kvblk_stats *")
        lib.kvblk_get_stats(self._engine, s)
        return {k: getattr(s, k) for k in ("requests", "deferred", "io_errors", "interrupts", "syncs", "busy_ns")}

    def stop(self) -> None:
        if self._engine is not None:
            lib.kvblk_stop(self._engine)
            self._engine = None
