"""virtio-net's transmit queue on a C thread (src/net.c), as the model sees it.

:class:`NetTxEngine` owns a :class:`~kvmkit_native.queue.NativeSplitQueue`
from start to stop: the thread pops each chain, checks its virtio-net header
against the negotiated features and the size limits, writes header and frame
to the tap with one writev() (straight from guest memory), returns the chain
and interrupts by itself.  Chains it leaves to Python (runts, bad or
unnegotiated offloads, oversize frames, frames the tap refused) come back
through :meth:`service`, which the core's worker calls with the device lock
held when ``event_fd`` is readable: each goes to ``on_frame(chain)`` (the
model counts and drops it, or sends it again) and is then returned in C.
"""
from __future__ import annotations

from typing import Callable

from kvmkit.plugin_api import Chain

from ._native import ffi, lib
from .engine import QueueEngine
from .queue import NativeSplitQueue

__all__ = ["NetTxEngine", "STAT_NAMES"]

STAT_NAMES = ("tx_frames", "tx_bytes", "deferred", "write_errors", "dropped", "interrupts",
              "busy_ns")


class NetTxEngine(QueueEngine):
    _start_fn = lib.kvnet_tx_start
    _stats_fn = lib.kvnet_tx_get_stats
    _stats_type = "struct kvnet_tx_stats *"
    _stat_names = STAT_NAMES

    def __init__(self, queue: NativeSplitQueue, *, tap_fd: int, features: int, plain_limit: int,
                 gso_limit: int, kick_fd: int, irq_fd: int, resample_fd: int,
                 on_frame: Callable[[Chain], None]):
        self.on_frame = on_frame
        super().__init__(queue, ffi.new("struct kvnet_tx_config *", {
            "tap_fd": tap_fd, "features": features, "plain_limit": plain_limit,
            "gso_limit": gso_limit, "kick_fd": kick_fd, "irq_fd": irq_fd,
            "resample_fd": resample_fd}))

    def _deferred(self, chain: Chain) -> None:
        try:
            self.on_frame(chain)
        finally:
            self._complete(chain.head, 0)
