"""The ``native`` entry of the ``kvmkit.queues`` group."""
from __future__ import annotations

from .blk import BlkEngine
from .net import NetTxEngine
from .queue import NativeSplitQueue

__all__ = ["NativeQueues", "backend"]



def _version() -> str:
    # importlib.metadata costs ~30 ms to import: only when the description is read
    import importlib.metadata
    try:
        return importlib.metadata.version("kvmkit-native")
    except importlib.metadata.PackageNotFoundError:      # run from a source tree
        return "source"


class NativeQueues:
    name = "native"

    @property
    def description(self) -> str:
        return ("split virtqueue in C, virtio-blk and virtio-net transmit data paths on C threads "
                f"(kvmkit-native {_version()})")

    def split_queue(self, memory, size, desc, avail, used, *, event_idx, indirect):
        return NativeSplitQueue(memory, size, desc, avail, used, event_idx=event_idx,
                                indirect=indirect)

    def blk_engine(self, queue, **kwargs) -> BlkEngine | None:
        """virtio-blk's whole data path for ``queue`` on a C thread (keywords:
        see BlkEngine); None when ``queue`` is not one of this backend's."""
        if not isinstance(queue, NativeSplitQueue):
            return None
        return BlkEngine(queue, **kwargs)

    def net_tx_engine(self, queue, **kwargs) -> NetTxEngine | None:
        """virtio-net's transmit queue ``queue`` to a tap on a C thread
        (keywords: see NetTxEngine); None when ``queue`` is not one of this
        backend's."""
        if not isinstance(queue, NativeSplitQueue):
            return None
        return NetTxEngine(queue, **kwargs)


backend = NativeQueues()
