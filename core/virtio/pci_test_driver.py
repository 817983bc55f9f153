"""A virtio-pci driver for tests: the guest's side of a device behind the
core's real transport, reached through a :class:`~kvmkit.fake_machine.FakeMachine`'s
PCI config space and MMIO bus as a vCPU would.

:class:`PciVirtioDriver` programs the BAR (optionally at an address of its
own), enables memory decoding and MSI-X (a vector per queue and one for
configuration changes), negotiates features, lays out every queue in guest
memory (:class:`~kvmkit.virtio.driver_model.DriverQueue`) and sets DRIVER_OK;
then it submits chains, notifies through the notify area and runs the
queues (``machine.run_kicks()``).  :meth:`PciVirtioDriver.clone` copies the
driver's own bookkeeping onto another machine whose memory is a copy of this
one's: a snapshot restored elsewhere is driven on from where it was.
"""
from __future__ import annotations

import copy
import time
from typing import Sequence

from ..pci import PCI_CAP_ID_MSIX
from ..pci.config_space import BAR0, COMMAND, COMMAND_BUS_MASTER, COMMAND_MEMORY
from .device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from .driver_model import DriverQueue, GuestAllocator
from .pci_transport import (COMMON, DEVICE, MSIX_TABLE, NO_VECTOR, NOTIFY, NOTIFY_MULTIPLIER,
                            STATUS_DRIVER_OK, STATUS_FEATURES_OK)

__all__ = ["PciVirtioDriver"]

ACKNOWLEDGE, DRIVER = 1, 2
MSI_ADDRESS = 0xFEE0_0000


class PciVirtioDriver:
    """Drive the virtio runtime ``runtime`` of ``machine`` (a FakeMachine).

    ``bar_address``: move BAR 0 there first (the guest may reprogram it);
    ``msix``: use MSI-X (else INTx); ``event_idx``/``indirect``: negotiate
    those; ``rings_at``/``buffers_at``: guest-physical areas for the rings and
    the request buffers."""

    def __init__(self, machine, runtime, *, bar_address: int | None = None, msix: bool = True,
                 event_idx: bool = True, indirect: bool = False, rings_at: int = 0x10000,
                 buffers_at: int = 0x80000, queue_sizes: Sequence[int] | None = None):
        self.machine = machine
        self.runtime = runtime
        self.memory = machine.memory
        self.config = runtime.transport.config
        cfg = self.config
        if bar_address is not None:
            cfg.write(BAR0, 4, bar_address & 0xFFFF_FFFF)
            cfg.write(BAR0 + 4, 4, bar_address >> 32)
        cfg.write(COMMAND, 2, COMMAND_MEMORY | COMMAND_BUS_MASTER)
        self.bar = cfg.bar(0).address
        device = runtime.device
        nq = len(device.queue_sizes)
        self.msix = msix
        if msix:
            cap = next(off for off, cap_id in cfg.capabilities() if cap_id == PCI_CAP_ID_MSIX)
            for v in range(nq + 1):
                entry = self.bar + MSIX_TABLE + 16 * v
                self.write(entry, 4, MSI_ADDRESS)
                self.write(entry + 4, 4, 0)
                self.write(entry + 8, 4, 0x40 + v)
                self.write(entry + 12, 4, 0)                     # unmasked
            cfg.write(cap + 2, 2, 1 << 15)                        # MSI-X enable
        self.common(0x14, 1, 0)                                   # reset
        self.common(0x14, 1, ACKNOWLEDGE)
        self.common(0x14, 1, ACKNOWLEDGE | DRIVER)
        offered = 0
        for half in (0, 1):
            self.common(0x00, 4, half)
            offered |= self.common(0x04, 4) << (32 * half)
        wanted = offered & ~((1 << VIRTIO_F_RING_EVENT_IDX) | (1 << VIRTIO_F_RING_INDIRECT_DESC))
        wanted |= offered & ((1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0)
        wanted |= offered & ((1 << VIRTIO_F_RING_INDIRECT_DESC) if indirect else 0)
        wanted |= 1 << VIRTIO_F_VERSION_1
        self.features = wanted
        for half in (0, 1):
            self.common(0x08, 4, half)
            self.common(0x0C, 4, (wanted >> (32 * half)) & 0xFFFF_FFFF)
        self.common(0x14, 1, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK)
        if not self.common(0x14, 1) & STATUS_FEATURES_OK:
            raise RuntimeError("the device refused the features")
        rings = GuestAllocator(self.memory, rings_at, buffers_at)
        self.buffers = GuestAllocator(self.memory, buffers_at)
        sizes = list(queue_sizes if queue_sizes is not None else device.queue_sizes)
        self.queues: list[DriverQueue] = []
        for i, size in enumerate(sizes):
            drv = DriverQueue(self.memory, size, rings, indirect_max=16 if indirect else 0,
                              event_idx=bool(wanted >> VIRTIO_F_RING_EVENT_IDX & 1))
            self.common(0x16, 2, i)
            self.common(0x18, 2, size)
            self.common(0x1A, 2, i if msix else NO_VECTOR)
            desc, avail, used = drv.addresses
            self.common(0x20, 8, desc)
            self.common(0x28, 8, avail)
            self.common(0x30, 8, used)
            self.common(0x1C, 2, 1)
            self.queues.append(drv)
        self.common(0x10, 2, nq if msix else NO_VECTOR)            # config vector
        self.common(0x14, 1, ACKNOWLEDGE | DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    # -- register access through the MMIO bus --------------------------------------------
    def read(self, address: int, size: int) -> int:
        return self.machine.mmio.read(address, size)

    def write(self, address: int, size: int, value: int) -> None:
        self.machine.mmio.write(address, size, value)

    def common(self, off: int, size: int, value: int | None = None) -> int | None:
        if size == 8 and value is not None:               # two 32-bit halves, as Linux does
            self.write(self.bar + COMMON + off, 4, value & 0xFFFF_FFFF)
            self.write(self.bar + COMMON + off + 4, 4, value >> 32)
            return None
        if value is None:
            return self.read(self.bar + COMMON + off, size)
        self.write(self.bar + COMMON + off, size, value)
        return None

    def device_config(self, off: int, size: int) -> int:
        return self.read(self.bar + DEVICE + off, size)

    @property
    def status(self) -> int:
        return self.common(0x14, 1)

    # -- requests ------------------------------------------------------------------------
    def submit(self, queue: int, readable: Sequence[bytes] = (), writable: Sequence[int] = ()):
        """Put a chain on ``queue`` (not yet notified); returns (head, writable buffers)."""
        rd, wr = self.buffers.chain_buffers(readable, writable)
        head = self.queues[queue].add(rd, wr)
        return head, wr

    def notify(self, queue: int, wait: float = 2.0) -> list[tuple[int, int]]:
        """Kick ``queue`` through the notify area, run the kicked queues, and
        return the used elements of ``queue`` since the last look.  On a real
        machine (no ``run_kicks``: the device's worker runs them) wait up to
        ``wait`` seconds for all chains in flight to come back."""
        q = self.queues[queue]
        q.publish()
        self.write(self.bar + NOTIFY + queue * NOTIFY_MULTIPLIER, 2, queue)
        run = getattr(self.machine, "run_kicks", None)
        if run is not None:
            run()
            return q.used()
        out: list[tuple[int, int]] = []
        deadline = time.monotonic() + wait
        while True:
            out += q.used()
            if not q.in_flight or time.monotonic() > deadline:
                return out
            time.sleep(0.002)

    def written(self, buffers, length: int) -> bytes:
        data = b"".join(self.memory.read(gpa, n) for gpa, n in buffers)
        return data[:length]

    # -- snapshots -----------------------------------------------------------------------
    def clone(self, machine, runtime) -> "PciVirtioDriver":
        """This driver's bookkeeping on ``machine`` (whose memory is a copy of
        this machine's, and whose device was restored from this one's)."""
        other = copy.copy(self)
        other.machine, other.runtime, other.memory = machine, runtime, machine.memory
        other.config = runtime.transport.config
        other.buffers = copy.copy(self.buffers)
        other.buffers.memory = machine.memory
        other.queues = []
        for q in self.queues:
            c = copy.copy(q)
            c.memory = machine.memory
            c.free = copy.copy(q.free)
            c.chains = copy.deepcopy(q.chains)
            other.queues.append(c)
        return other
