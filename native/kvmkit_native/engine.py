"""A queue engine (src/engine.c) as the model sees it: one virtqueue run by a
C thread that serves what it can and hands the rest to Python.

:class:`QueueEngine` owns a :class:`~kvmkit_native.queue.NativeSplitQueue`
from start to stop.  Chains the thread leaves to Python come back through
:meth:`service`, which the core's worker calls with the device lock held when
``event_fd`` is readable; each goes to the subclass's :meth:`_deferred`,
which hands it to the model and completes it in C.  The subclasses
(:class:`~kvmkit_native.blk.BlkEngine`, :class:`~kvmkit_native.net.NetTxEngine`)
say how the thread starts, what a deferred chain is, and which
counters there are.
"""
from __future__ import annotations

from kvmkit.plugin_api import Chain, VirtqueueError

from ._native import ffi, lib
from .queue import NativeSplitQueue, chain_from

__all__ = ["QueueEngine"]

_BATCH = 64
_ERR = 256


class QueueEngine:
    """What every engine does; subclasses set the class attributes below and
    implement :meth:`_deferred`."""

    _start_fn = None                    # lib.<device>_start(kvq, config, err, errlen)
    _stats_fn = None                    # lib.<device>_get_stats(engine, out)
    _stats_type = ""                    # its C struct, e.g. "struct kvblk_stats *"
    _stat_names: tuple[str, ...] = ()   # the fields stats() returns

    def __init__(self, queue: NativeSplitQueue, config):
        self.queue = queue                       # the engine's kvq lives in it
        err = ffi.new("char[]", _ERR)
        engine = self._start_fn(queue.kvq, config, err, _ERR)
        if engine == ffi.NULL:
            raise OSError(ffi.string(err).decode(errors="replace"))
        self._engine = engine
        self._chains = ffi.new("struct kvq_chain[]", _BATCH)
        self._stats = ffi.new(self._stats_type)
        self.event_fd = lib.kveng_event_fd(engine)

    def _deferred(self, chain: Chain) -> None:
        """Hand a chain the thread left to Python to the model, then
        :meth:`_complete` it."""
        raise NotImplementedError

    def _complete(self, head: int, written: int) -> None:
        lib.kveng_complete(self._engine, head, written)

    def service(self) -> None:
        """Hand the deferred chains to the model and complete them; raise
        VirtqueueError once the queue broke."""
        while True:
            n = lib.kveng_take_deferred(self._engine, self._chains, _BATCH)
            for i in range(n):
                self._deferred(chain_from(self._chains[i]))
            if n < _BATCH:
                break
        msg = ffi.new("char[]", _ERR)
        if lib.kveng_broken(self._engine, msg, _ERR):
            raise VirtqueueError(ffi.string(msg).decode(errors="replace"))

    def pause(self) -> None:
        lib.kveng_pause(self._engine)

    def resume(self) -> None:
        lib.kveng_resume(self._engine)

    def set_masked(self, masked: bool) -> None:
        lib.kveng_set_masked(self._engine, int(masked))

    def take_isr(self) -> int:
        return lib.kveng_take_isr(self._engine)

    def stats(self) -> dict[str, int]:
        """The engine's counters (after stop: their final values)."""
        s = self._stats
        if self._engine is not None:
            self._stats_fn(self._engine, s)
        return {k: getattr(s, k) for k in self._stat_names}

    def stop(self) -> None:
        if self._engine is not None:
            self._stats_fn(self._engine, self._stats)
            lib.kveng_stop(self._engine)
            self._engine = None
