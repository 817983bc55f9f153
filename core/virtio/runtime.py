"""Wiring a virtio device to KVM through the virtio-pci transport.

Per device: a PCI function on bus 0 with its BAR in the PCI hole, the BAR on
the MMIO bus while the guest has memory decoding on, an ioeventfd per queue
notification address (a kick never waits on the VMM), an irqfd per MSI-X
vector (GSI routes follow the guest's MSI-X table), INTx on a shared GSI as
the fallback, and a worker thread that runs the device when its queues are
kicked.  Everything that touches the device holds the device's lock.

A device model may hand a queue to an engine that runs it off the GIL (the
native backend's virtio-blk data path): :meth:`VirtioPciRuntime.wiring`
gives it the queue's kick eventfd and interrupt eventfds, and
:meth:`VirtioPciRuntime.offload` makes the worker stop polling that kick and
poll the engine's ``event_fd`` instead (calling ``engine.service()`` with the
device lock held), forward the MSI-X mask state (``set_masked``), read its ISR
bits (``take_isr``) and pause it with the VM (``pause``/``resume``).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import select

from ..irq import MsiVector
from ..plugin_api import EXIT_ERROR
from ..pci_mapping import add_function, intx_gsi
from .pci_transport import BAR_INDEX, NO_VECTOR, NOTIFY, NOTIFY_MULTIPLIER, VirtioPciTransport
from .queue import VirtqueueError

log = logging.getLogger("kvmkit.virtio")


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


@dataclasses.dataclass(frozen=True)
class QueueWiring:
    """What an engine needs to run queue ``index`` by itself."""

    kick_fd: int          # eventfd the guest's notifications arrive on (ioeventfd)
    irq_fd: int           # eventfd that interrupts the guest (an irqfd); -1: no interrupt
    resample_fd: int      # INTx: eventfd KVM signals at the guest's EOI; -1 with MSI-X

    @property
    def msix(self) -> bool:
        return self.resample_fd < 0


class VirtioPciRuntime:
    def __init__(self, machine, ctx, device, backend):
        self.machine = machine
        self.ctx = ctx
        self.device = device
        self.backend = backend
        self.vectors: list[MsiVector] = []
        self.queue_fds = [_eventfd() for _ in device.queue_sizes]
        self.stop_fd = _eventfd()
        self.wake_fd = _eventfd()                # the worker re-reads what it polls
        self.offloads: dict[int, object] = {}   # queue index -> engine
        self._generation = 0
        self._intx_fds: tuple[int, int] | None = None     # (trigger, resample) irqfd pair
        self._paused = False
        self.transport = VirtioPciTransport(device, machine.memory, deliver=self._deliver,
                                            set_intx=self._set_intx, kick=self._kick,
                                            on_vector_change=self._route,
                                            on_msix_control=self._msix_control,
                                            queue_factory=backend.split_queue)
        device.queue_backend = backend
        device.host = self
        if log.isEnabledFor(logging.INFO):        # a backend's description may cost to make
            log.info("%s: virtqueues: %s (%s)", ctx.name, backend.name, backend.description)
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
                self.transport.glog.warning(("ioeventfd", i), "%s: queue %d ioeventfd: %s",
                                            self.ctx.name, i, e)

    # -- interrupts --------------------------------------------------------------------------
    def _route(self, index: int) -> None:
        entry = self.transport.msix.vector(index)
        if not entry.masked:
            self.vectors[index].route(entry.address, entry.data)
        self._forward_masks()

    def _msix_control(self, enabled: bool, function_masked: bool) -> None:
        self.transport.glog.info("msix", "%s: MSI-X %s%s", self.ctx.name,
                                 "enabled" if enabled else "disabled",
                                 " (function masked)" if function_masked else "")
        self._forward_masks()

    def _forward_masks(self) -> None:
        """Tell each engine whether its queue's MSI-X vector is masked (an
        engine keeps an interrupt pending while it is, and sends it on unmask)."""
        msix = self.transport.msix
        for index, engine in self.offloads.items():
            vector = self.transport.queues[index].vector
            if msix.enabled and vector != NO_VECTOR:
                engine.set_masked(msix.function_masked or msix.vector(vector).masked)

    def _deliver(self, index: int, address: int, data: int) -> None:
        # The route already follows the table: _route ran when the entry was
        # unmasked or changed (before any message of it can be delivered).
        self.vectors[index].fire()

    def _set_intx(self, level: bool) -> None:
        if hasattr(self, "line"):
            self.line.set_level(level)

    def _intx(self) -> tuple[int, int]:
        """The INTx irqfd pair (trigger, resample) on the function's GSI."""
        if self._intx_fds is None:
            trigger, resample = _eventfd(), _eventfd()
            try:
                self.machine.vm.irqfd(trigger, intx_gsi(self.slot), resample_fd=resample)
            except BaseException:
                os.close(trigger)
                os.close(resample)
                raise
            self._intx_fds = (trigger, resample)
        return self._intx_fds

    # -- engines that run a queue by themselves ------------------------------------------------
    def wiring(self, index: int) -> QueueWiring:
        """The eventfds an engine uses to run queue ``index`` (call with the
        device lock held, from ``activate``)."""
        transport = self.transport
        if transport.msix.enabled:
            vector = transport.queues[index].vector
            fd = self.vectors[vector].fd if vector != NO_VECTOR else -1
            return QueueWiring(self.queue_fds[index], fd, -1)
        trigger, resample = self._intx()
        return QueueWiring(self.queue_fds[index], trigger, resample)

    def offload(self, index: int, engine) -> None:
        """``engine`` runs queue ``index`` from now on (see the module doc)."""
        self.offloads[index] = engine
        self.transport.isr_sources.append(engine.take_isr)
        self._forward_masks()
        if self._paused:
            engine.pause()
        self._changed()

    def release(self, index: int) -> None:
        """Queue ``index`` is the worker's again (call before stopping its engine)."""
        engine = self.offloads.pop(index, None)
        if engine is not None:
            self.transport.isr_sources.remove(engine.take_isr)
            if self._paused:
                engine.resume()
            self._changed()
            self._kick(index)           # chains the engine left are the worker's now

    def _changed(self) -> None:
        self._generation += 1
        os.eventfd_write(self.wake_fd, 1)

    def pause(self) -> None:
        """The VM pauses (the device lock is held): engines stop between requests."""
        self._paused = True
        for engine in self.offloads.values():
            engine.pause()

    def resume(self) -> None:
        self._paused = False
        for engine in self.offloads.values():
            engine.resume()

    # -- snapshots (kvmkit.device_state) -----------------------------------------------------
    def quiesce(self) -> None:
        """Before a save, with the VM paused (engines paused, the device lock
        held by the pause thread): hand every chain an engine left to Python
        to the model now, so that no popped chain is left unanswered and
        each queue's last_avail counts completed requests only."""
        for index, engine in list(self.offloads.items()):
            self._service(index, engine)

    def save_state(self) -> dict:
        self.quiesce()
        return {"config": self.transport.config.save_state(),
                "msix": self.transport.msix.save_state(),
                "transport": self.transport.save_state()}

    def restore_state(self, state: dict) -> None:
        """On a machine that has not run: the MSI-X table (routes), the
        config space (BARs mapped with their ioeventfds, MSI-X enabled
        again), the transport's registers and the activated device with its
        queues (and engines) at the saved indices."""
        transport = self.transport
        transport.msix.restore_state(state["msix"])
        transport.config.restore_state(state["config"])
        transport.restore_state(state["transport"])
        self._forward_masks()

    def after_restore(self) -> None:
        self.transport.after_restore()

    # -- the worker --------------------------------------------------------------------------
    def _kick(self, index: int) -> None:
        if index < len(self.queue_fds):
            os.eventfd_write(self.queue_fds[index], 1)

    def start(self) -> None:
        self.worker = self.ctx.spawn("queues", self._work)

    def _handlers(self) -> dict:
        """fd -> what to run when it is readable (read with the device lock held)."""
        handlers = {fd: (True, lambda i=i: self.transport.notify(i))
                    for i, fd in enumerate(self.queue_fds) if i not in self.offloads}
        for index, engine in self.offloads.items():
            handlers[engine.event_fd] = (False, lambda i=index, e=engine: self._service(i, e))
        return handlers

    def _service(self, index: int, engine) -> None:
        try:
            engine.service()
        except VirtqueueError as e:
            self.transport.glog.warning(("broken", index), "virtio device %d: queue %d: %s",
                                        self.device.device_id, index, e)
            self.transport.needs_reset()

    def _work(self) -> None:
        while not self.ctx.stopping.is_set():
            with self.ctx.lock:
                generation = self._generation
                handlers = self._handlers()
            poller = select.poll()
            for fd in (*handlers, self.stop_fd, self.wake_fd):
                poller.register(fd, select.POLLIN)
            while generation == self._generation and not self.ctx.stopping.is_set():
                for fd, _ in poller.poll(500):
                    if fd == self.stop_fd:
                        return
                    if fd == self.wake_fd:
                        os.eventfd_read(fd)
                        continue
                    is_kick, handler = handlers[fd]
                    if is_kick:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            continue
                    try:
                        with self.ctx.lock:
                            if generation != self._generation:
                                break                  # an engine came or went: re-read
                            handler()
                    except Exception as e:           # a device bug: stop the VM, name the device
                        log.debug("%s: queue worker failed", self.ctx.name, exc_info=True)
                        self.ctx.request_stop(f"device {self.ctx.name} failed: "
                                              f"{type(e).__name__}: {e}", EXIT_ERROR)
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
        if self._intx_fds is not None:
            trigger, resample = self._intx_fds
            try:
                self.machine.vm.irqfd(trigger, intx_gsi(self.slot), resample_fd=resample,
                                      deassign=True)
            except OSError:
                pass
            os.close(trigger)
            os.close(resample)
        for fd in (*self.queue_fds, self.stop_fd, self.wake_fd):
            os.close(fd)
