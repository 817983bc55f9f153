"""Queue backends: who runs a virtio device's virtqueues.

Backends are found through the entry-point group ``kvmkit.queues`` (every
installed one, no machine file needed): the core registers ``python`` (the
pure-Python :class:`~kvmkit.virtio.queue.SplitQueue`), and the
``kvmkit-native`` distribution registers ``native`` (queues in C).  A virtio
device's ``queue`` key picks one: ``"auto"`` (the default) takes native when it
is installed and loads, else python; a named backend that is not installed is
an error saying how to fix it.

A backend object has ``name``, ``description`` and
``split_queue(memory, size, desc, avail, used, *, event_idx, indirect)``
returning an object with SplitQueue's interface.  It may offer more, such as
the native backend's ``blk_engine`` (virtio-blk's whole data path in C), which
a device model looks for with ``getattr``.
"""
from __future__ import annotations

import functools
import importlib.metadata
import logging

from .queue import SplitQueue

__all__ = ["QUEUE_GROUP", "PythonQueues", "resolve", "BackendError"]

QUEUE_GROUP = "kvmkit.queues"
log = logging.getLogger("kvmkit.virtio")


class BackendError(Exception):
    """A queue backend cannot be had (the message says what to do)."""


class PythonQueues:
    """The pure-Python split virtqueue; always there."""

    name = "python"
    description = "pure-Python split virtqueue (kvmkit core)"

    def split_queue(self, memory, size, desc, avail, used, *, event_idx, indirect):
        return SplitQueue(memory, size, desc, avail, used, event_idx=event_idx, indirect=indirect)


PYTHON = PythonQueues()


@functools.cache
def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The group, read once per process: `kvmkit check` and each virtio
    device's creation resolve a backend, and a scan costs about 2 ms."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=QUEUE_GROUP)}


_loaded: dict[str, object] = {}


def _load(ep: importlib.metadata.EntryPoint):
    if ep.name not in _loaded:
        try:
            _loaded[ep.name] = ep.load()
        except Exception as e:
            dist = ep.dist.name if ep.dist else ep.value
            raise BackendError(f"queue backend {ep.name!r} ({dist}) failed to load: "
                               f"{type(e).__name__}: {e}; reinstall it") from e
    return _loaded[ep.name]


def resolve(choice: str, where: str):
    """The backend for a device's ``queue`` value; ``where`` names the device
    for the error message."""
    eps = _entry_points()
    if choice == "auto":                 # native if it is there and loads
        if "native" in eps:
            try:
                return _load(eps["native"])
            except BackendError as e:
                log.warning("%s: %s; using the python queue", where, e)
        return PYTHON
    if choice == "python":               # the core's own, registered or not
        return PYTHON
    if choice not in eps:
        if choice == "native":
            raise BackendError(f"{where}: queue = \"native\", but the native queue backend is not "
                               "installed; pip install ./native (kvmkit-native), or set "
                               "queue = \"python\" or \"auto\"")
        have = ", ".join(sorted({*eps, "python"}))
        raise BackendError(f"{where}: queue = {choice!r} is not an installed queue backend "
                           f"(installed: {have}; \"auto\" picks the best)")
    try:
        return _load(eps[choice])
    except BackendError as e:
        raise BackendError(f"{where}: {e}") from None
