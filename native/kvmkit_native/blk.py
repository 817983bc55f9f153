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

from kvmkit.plugin_api import Chain

from ._native import ffi, lib
from .engine import QueueEngine
from .queue import NativeSplitQueue

__all__ = ["BlkEngine"]


class BlkEngine(QueueEngine):
    _start_fn = lib.kvblk_start
    _stats_fn = lib.kvblk_get_stats
    _stats_type = "struct kvblk_stats *"
    _stat_names = ("requests", "deferred", "io_errors", "interrupts", "syncs", "sync_errors",
                   "busy_ns", "polled", "poll_ns")

    def __init__(self, queue: NativeSplitQueue, *, image_fd: int, capacity: int, readonly: bool,
                 writethrough: bool, direct_align: int, kick_fd: int, irq_fd: int,
                 resample_fd: int, on_request: Callable[[Chain], int], poll_ns: int = 0):
        self.on_request = on_request
        super().__init__(queue, ffi.new("struct kvblk_config *", {
            "image_fd": image_fd, "capacity": capacity, "readonly": int(readonly),
            "writethrough": int(writethrough), "direct_align": direct_align,
            "kick_fd": kick_fd, "irq_fd": irq_fd, "resample_fd": resample_fd, "poll_ns": poll_ns}))

    def _deferred(self, chain: Chain) -> None:
        self._complete(chain.head, self.on_request(chain))
