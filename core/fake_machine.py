"""A machine without KVM, for tests (re-exported by kvmkit.testing).

:class:`FakeMachine` has what a real :class:`kvmkit.device_context.DeviceContext`
uses of a machine: the PIO and MMIO buses, the PCI host, the BAR allocators,
a GSI router and interrupt lines, over :class:`FakeVm`, which records what
would have gone to KVM (ioeventfds, irqfds, GSI routes, line levels) instead.
So a device created with ``machine.context(name)`` sits behind the core's own
virtio-pci transport and BAR mapping, and a test reaches it through the buses
as a vCPU would (``machine.mmio.read(address, size)``).  Nothing runs: the
virtio worker is not started, so a test calls ``transport.notify(i)`` itself
(or :meth:`FakeMachine.run_kicks`).
"""
from __future__ import annotations

import os
import threading

from .bus import Bus
from .irq import Gsi, GsiRouter, IrqLine, line as irq_line
from .pci.allocator import IoAllocator, MmioAllocator
from .pci.host_bridge import PciHost
from .plugin_api import MMIO, PIO

__all__ = ["FakeVm", "FakeMachine"]


class FakeVm:
    """Records the VM ioctls the device side makes."""

    def __init__(self) -> None:
        self.ioeventfds: dict[int, int] = {}         # notify address -> eventfd
        self.irqfds: dict[int, int] = {}             # GSI -> eventfd
        self.routes: list[tuple] = []                # the last GSI routing table set
        self.lines: dict[int, int] = {}              # GSI -> level of the last irq_line
        self.line_history: list[tuple[int, int]] = []

    def ioeventfd(self, fd: int, address: int, size: int, deassign: bool = False) -> None:
        if deassign:
            self.ioeventfds.pop(address, None)
        else:
            self.ioeventfds[address] = fd

    def irqfd(self, fd: int, gsi: int, resample_fd: int | None = None, deassign: bool = False) -> None:
        if deassign:
            self.irqfds.pop(gsi, None)
        else:
            self.irqfds[gsi] = fd

    def set_gsi_routing(self, routes) -> None:
        self.routes = list(routes)

    def irq_line(self, gsi: int, level: int) -> None:
        self.lines[gsi] = level
        self.line_history.append((gsi, level))

    def msi_routes(self) -> dict[int, tuple[int, int]]:
        """GSI -> (address, data) of the MSI routes in the table."""
        return {r[1]: (r[2], r[3]) for r in self.routes if r[0] == "msi"}


class _Config:
    name = "fake"


class FakeMachine:
    """See the module doc.  ``memory``: a kvmkit GuestMemory."""

    def __init__(self, memory) -> None:
        self.config = _Config()
        self.memory = memory
        self.vm = FakeVm()
        self.pio = Bus(PIO)
        self.mmio = Bus(MMIO)
        self.pci = PciHost()
        self.mmio_alloc = MmioAllocator()
        self.io_alloc = IoAllocator()
        self.router = GsiRouter(self.vm)
        self.virtio: list = []
        self.shutdown_handlers: list = []
        self.stopping = threading.Event()
        self.stop_requests: list[tuple[str, int]] = []
        self._gsis: dict[int, Gsi] = {}

    def context(self, name: str):
        """A real DeviceContext on this machine."""
        from .device_context import DeviceContext
        return DeviceContext(self, name)

    def irq(self, gsi: int) -> IrqLine:
        return irq_line(self._gsis, self.vm, gsi)

    def request_stop(self, reason: str, code: int = 0) -> None:
        self.stop_requests.append((reason, code))
        self.stopping.set()

    def run_kicks(self) -> None:
        """Do what the virtio workers would: for every queue whose kick
        eventfd is readable, run ``transport.notify``, and for every engine
        whose event fd is readable, its ``service()`` (under the device lock)."""
        import select
        for runtime in self.virtio:
            for i, fd in enumerate(runtime.queue_fds):
                if i in runtime.offloads:
                    continue
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                with runtime.ctx.lock:
                    runtime.transport.notify(i)
            for i, engine in list(runtime.offloads.items()):
                if select.select([engine.event_fd], [], [], 0)[0]:
                    with runtime.ctx.lock:
                        runtime._service(i, engine)

    def close(self) -> None:
        self.stopping.set()
        for runtime in self.virtio:
            runtime.close()
