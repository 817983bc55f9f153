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

from kvmkit.plugin_api import Chain, VirtqueueError

from ._native import ffi, lib
from .blk import chain_of
from .queue import NativeSplitQueue

__all__ = ["NetTxEngine", "STAT_NAMES"]

_BATCH = 64
_ERR = 256
STAT_NAMES = ("tx_frames", "tx_bytes", "deferred", "write_errors", "dropped", "interrupts",
              "busy_ns")


class NetTxEngine:
    def __init__(self, queue: NativeSplitQueue, *, tap_fd: int, features: int, plain_limit: int,
                 gso_limit: int, kick_fd: int, irq_fd: int, resample_fd: int,
                 on_frame: Callable[[Chain], None]):
        self.queue = queue                       # the engine's kvq lives in it
        self.on_frame = on_frame
        config = ffi.new("struct kvnet_tx_config *", {
            "tap_fd": tap_fd, "features": features, "plain_limit": plain_limit,
            "gso_limit": gso_limit, "kick_fd": kick_fd, "irq_fd": irq_fd,
            "resample_fd": resample_fd})
        err = ffi.new("char[]", _ERR)
        engine = lib.kvnet_tx_start(queue.kvq, config, err, _ERR)
        if engine == ffi.NULL:
            raise OSError(ffi.string(err).decode(errors="replace"))
        self._engine = engine
        self._chains = ffi.new("struct kvq_chain[]", _BATCH)
        self._stats = ffi.new("struct kvnet_tx_stats *")
        self.event_fd = lib.kvnet_tx_event_fd(engine)

    def service(self) -> None:
        """Hand the deferred chains to ``on_frame`` and return them; raise
        VirtqueueError once the queue broke."""
        while True:
            n = lib.kvnet_tx_take_deferred(self._engine, self._chains, _BATCH)
            for i in range(n):
                chain = chain_of(self._chains[i])
                try:
                    self.on_frame(chain)
                finally:
                    lib.kvnet_tx_complete(self._engine, chain.head)
            if n < _BATCH:
                break
        msg = ffi.new("char[]", _ERR)
        if lib.kvnet_tx_broken(self._engine, msg, _ERR):
            raise VirtqueueError(ffi.string(msg).decode(errors="replace"))

    def pause(self) -> None:
        lib.kvnet_tx_pause(self._engine)

    def resume(self) -> None:
        lib.kvnet_tx_resume(self._engine)

    def set_masked(self, masked: bool) -> None:
        lib.kvnet_tx_set_masked(self._engine, int(masked))

    def take_isr(self) -> int:
        return lib.kvnet_tx_take_isr(self._engine)

    def stats(self) -> dict[str, int]:
        """The engine's counters (after stop: their final values)."""
        s = self._stats
        if self._engine is not None:
            lib.kvnet_tx_get_stats(self._engine, s)
        return {k: getattr(s, k) for k in STAT_NAMES}

    def stop(self) -> None:
        if self._engine is not None:
            lib.kvnet_tx_get_stats(self._engine, self._stats)
            lib.kvnet_tx_stop(self._engine)
            self._engine = None
