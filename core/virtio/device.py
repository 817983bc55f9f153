"""The base class of virtio device models (re-exported by kvmkit.plugin_api).

A virtio device plugin subclasses :class:`VirtioDevice`, fills in the class
attributes and implements ``process``; the core's virtio-pci transport does
the rest (PCI function, capabilities, feature negotiation, queues, MSI-X or
INTx interrupts, notifications through ioeventfd, a worker thread).

Threading: ``process``, ``activate``, ``reset`` and the config accessors are
all called with the device's lock held (``ctx.lock``), so a model is never
entered by two threads at once.  ``process`` runs on the device's own worker
thread, never on a vCPU thread.
"""
from __future__ import annotations

from typing import Sequence

# Feature bits every transport offers (virtio 1.2, section 6).
VIRTIO_F_RING_INDIRECT_DESC = 28
VIRTIO_F_RING_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33

TRANSPORT_FEATURES = ((1 << VIRTIO_F_RING_INDIRECT_DESC) | (1 << VIRTIO_F_RING_EVENT_IDX)
                      | (1 << VIRTIO_F_VERSION_1))


class VirtioDevice:
    """A virtio device model.  Subclasses set:

    ``device_id``     the virtio device type (1 net, 2 block, 4 entropy, ...)
    ``features``      device-specific feature bits it offers (bits 0-23, 50+)
    ``queue_sizes``   the maximum size of each virtqueue (powers of two)
    ``pci_class``     the PCI class code (24 bits) the function reports
    """

    device_id: int = 0
    features: int = 0
    queue_sizes: Sequence[int] = ()
    pci_class: int = 0xFF0000

    def __init__(self) -> None:
        self.queues: list = []                  # SplitQueue per queue, set by activate()
        self.driver_features = 0
        self._interrupts: list[bool] = []
        self._config_generation = 0

    # -- device configuration space -----------------------------------------------------
    def config_bytes(self) -> bytes:
        """The device-specific configuration structure (little-endian)."""
        return b""

    def config_read(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """Writable config fields; read-only by default (writes ignored)."""

    def config_changed(self) -> None:
        """Call when config_bytes() changed: bumps the generation and raises
        a configuration-change interrupt."""
        self._config_generation += 1
        if self._notify_config is not None:
            self._notify_config()

    _notify_config = None

    def wake(self, index: int) -> None:
        """Ask for ``process(index)`` to run on the worker thread soon, as if the
        driver had kicked the queue: for work that arrives from the host side
        (a received packet).  Safe from any thread, with or without the lock."""
        if self._wake is not None:
            self._wake(index)

    _wake = None

    # Set by the core when the device is put on the transport: the queue
    # backend that builds ``self.queues`` (kvmkit.virtio.backends), and the
    # runtime, through which a model may hand a queue to an engine of that
    # backend that runs it by itself (``host.wiring(i)``, ``host.offload(i,
    # engine)``, ``host.release(i)``; see kvmkit.virtio.runtime).  Both stay
    # None outside a VM (unit tests), where the model serves its queues itself.
    queue_backend = None
    host = None

    # -- lifecycle ----------------------------------------------------------------------------
    def activate(self, queues: list, driver_features: int) -> None:
        """The driver set DRIVER_OK.  ``queues`` holds a SplitQueue (or None
        for a queue the driver did not enable) per entry of ``queue_sizes``.

        The transport activates a device once per reset, but a model must
        be idempotent anyway: a second call replaces the first (an engine
        or thread started for the old queues is stopped, never doubled)."""
        self.queues = queues
        self.driver_features = driver_features

    def reset(self) -> None:
        """The driver reset the device (or the VM is stopping)."""
        self.queues = []
        self.driver_features = 0

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1)

    # -- the data path --------------------------------------------------------------------
    def process(self, index: int) -> None:
        """Queue ``index`` was notified: pop chains, handle them, push used
        entries.  The transport interrupts the driver afterwards if the queue
        says it wants one."""
        raise NotImplementedError

    def close(self) -> None:
        """Release host resources (files, sockets); called once at VM end."""
