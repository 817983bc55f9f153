"""Wiring a virtio device to KVM through the virtio-pci transport.

Per device: a PCI function on bus 0 with its BAR in the PCI hole, the BAR on
the MMIO bus while the guest has memory decoding on, an ioeventfd per queue
notification address (a kick never waits on the VMM), an irqfd per MSI-X
vector (GSI routes follow the guest's MSI-X table), INTx on a shared GSI as
the fallback, and a worker thread that runs the device when its queues are
kicked.  Everything that touches the device holds the device's lock.
"""
from __future__ import annotations

import logging
import os
import select

from ..irq import MsiVector
from ..plugin_api import EXIT_ERROR
from ..pci_mapping import add_function, intx_gsi
from .pci_transport import BAR_INDEX, NOTIFY, NOTIFY_MULTIPLIER, VirtioPciTransport

log = logging.getLogger("kvmkit.virtio")


class VirtioPciRuntime:
    def __init__(self, machine, ctx, device):
        self.machine = machine
        self.ctx = ctx
        self.device = device
        self.vectors: list[MsiVector] = []
        self.queue_fds = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in device.queue_sizes]
        self.stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.transport = VirtioPciTransport(device, machine.memory, deliver=self._deliver,
                                            set_intx=self._set_intx, kick=self._kick,
                                            on_vector_change=self._route,
                                            on_msix_control=self._msix_control)
        self.vectors = [MsiVector(machine.router) for _ in range(self.transport.vectors)]
        self.slot, self.bars = add_function(
            machine, ctx, self.transport.config, {BAR_INDEX: self.transport},
            on_map=lambda _index, base: self._ioeventfds(base),
            on_unmap=lambda _index, base: self._ioeventfds(base, deassign=True))
        self.line = ctx.irq(intx_gsi(self.slot))
        self.worker = None

    def _ioeventfds(self, base: int, deassign: bool = False) -> None:
        for i, fd in enumerate(self.queue_fds):
            try:
                self.machine.vm.ioeventfd(fd, base + NOTIFY + i * NOTIFY_MULTIPLIER, 2, deassign=deassign)
            except OSError as e:            # kicks still arrive as MMIO exits
                log.warning("%s: queue %d ioeventfd: %s", self.ctx.name, i, e)

    # -- interrupts --------------------------------------------------------------------------
    def _route(self, index: int) -> None:
        entry = self.transport.msix.vector(index)
        if not entry.masked:
            self.vectors[index].route(entry.address, entry.data)

    def _msix_control(self, enabled: bool, function_masked: bool) -> None:
        log.info("%s: MSI-X %s%s", self.ctx.name, "enabled" if enabled else "disabled",
                 " (function masked)" if function_masked else "")

    def _deliver(self, index: int, address: int, data: int) -> None:
        # The route already follows the table: _route ran when the entry was
        # unmasked or changed (before any message of it can be delivered).
        self.vectors[index].fire()

    def _set_intx(self, level: bool) -> None:
        if hasattr(self, "line"):
            self.line.set_level(level)

    # -- the worker --------------------------------------------------------------------------
    def _kick(self, index: int) -> None:
        if index < len(self.queue_fds):
            os.eventfd_write(self.queue_fds[index], 1)

    def start(self) -> None:
        self.worker = self.ctx.spawn("queues", self._work)

    def _work(self) -> None:
        poller = select.poll()
        index_of = {fd: i for i, fd in enumerate(self.queue_fds)}
        for fd in (*self.queue_fds, self.stop_fd):
            poller.register(fd, select.POLLIN)
        while not self.ctx.stopping.is_set():
            for fd, _ in poller.poll(500):
                if fd == self.stop_fd:
                    return
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                try:
                    with self.ctx.lock:
                        self.transport.notify(index_of[fd])
                except Exception as e:           # a device bug: stop the VM, name the device
                    log.debug("%s: queue worker failed", self.ctx.name, exc_info=True)
                    self.ctx.request_stop(f"device {self.ctx.name} failed: {type(e).__name__}: {e}",
                                          EXIT_ERROR)
                    return

    def close(self) -> None:
        os.eventfd_write(self.stop_fd, 1)
        if self.worker is not None:
            self.worker.join(timeout=5)
        with self.ctx.lock:
            self.bars.unmap_all()
            self.transport.reset()
        for v in self.vectors:
            v.close()
        for fd in (*self.queue_fds, self.stop_fd):
            os.close(fd)
