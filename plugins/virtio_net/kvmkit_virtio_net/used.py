"""Returning several receive buffers at once.

With mergeable receive buffers one frame fills several chains, and the
driver reads ``num_buffers`` from the first and then expects the others to
be in the used ring already: Linux drops the frame ("rx error: N buffers out
of M missing") if its receive poll runs between two of them.  So all chains
of a frame must appear with one update of ``used.idx``.

The queue interface has only ``push`` (one element, published at once).  A
queue backend may provide ``push_many(elements)``; for the core's
pure-Python :class:`~kvmkit.plugin_api.SplitQueue` this module writes the
elements through its public ring address and index, then publishes the index
once (x86 keeps the stores in program order: the elements are visible before
the index, as ``push`` relies on too).
"""
from __future__ import annotations

import struct

__all__ = ["push_together"]

_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")


def push_together(queue, elements: list[tuple[int, int]]) -> None:
    """Return ``elements`` (``(head, written)`` pairs, in order) so that the
    driver sees all of them or none."""
    if len(elements) == 1:
        queue.push(*elements[0])
        return
    many = getattr(queue, "push_many", None)
    if many is not None:
        many(elements)
        return
    size, base, mem = queue.size, queue.used_addr, queue.memory
    idx = queue.used_idx
    for head, written in elements:
        if not 0 <= head < size:
            raise ValueError(f"head {head} is not a descriptor index of this queue")
        if not 0 <= written <= 0xFFFF_FFFF:
            raise ValueError(f"written length {written} does not fit the used element")
    for head, written in elements:
        mem.write(base + 4 + 8 * (idx % size), _ELEM.pack(head, written))
        idx = (idx + 1) & 0xFFFF
    queue.used_idx = idx
    mem.write(base + 2, _U16.pack(idx))
