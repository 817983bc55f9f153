"""Interrupt lines: GSIs of the in-kernel IOAPIC/PIC, raised with KVM_IRQ_LINE."""
from __future__ import annotations

import os
import threading

from .hypervisor._kvm import lib


class Gsi:
    """One interrupt input; devices sharing it are OR-ed like ISA lines."""

    def __init__(self, vm, gsi: int):
        self.vm, self.gsi = vm, gsi
        self.asserted: set = set()
        self.lock = threading.Lock()


class IrqLine:
    def __init__(self, gsi: Gsi):
        self._gsi = gsi
        self.gsi = gsi.gsi

    def set_level(self, high: bool) -> None:
        g = self._gsi
        with g.lock:
            before = bool(g.asserted)
            if high:
                g.asserted.add(self)
            else:
                g.asserted.discard(self)
            if bool(g.asserted) != before:
                g.vm.irq_line(g.gsi, int(not before))

    def pulse(self) -> None:
        g = self._gsi
        with g.lock:
            if not g.asserted:
                g.vm.irq_line(g.gsi, 1)
                g.vm.irq_line(g.gsi, 0)


def line(gsis: dict, vm, gsi: int) -> IrqLine:
    """A new line onto IOAPIC input ``gsi`` of ``vm``; ``gsis`` (the machine's
    GSI number -> Gsi) keeps one Gsi per input, so the lines on it are shared."""
    from .plugin_api import DeviceError
    if not 0 <= gsi < 24:
        raise DeviceError(f"IRQ {gsi} does not exist (the IOAPIC has inputs 0-23)")
    if gsi not in gsis:
        gsis[gsi] = Gsi(vm, gsi)
    return IrqLine(gsis[gsi])


FIRST_MSI_GSI = 24           # GSIs 0-23 are the IOAPIC's (0-15 also the PICs')


def default_routes() -> list[tuple]:
    """The routing KVM starts with: GSI n to IOAPIC pin n, and GSIs 0-15 to the PICs."""
    routes = [("irqchip", gsi, lib.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(24)]
    routes += [("irqchip", gsi, lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE,
                gsi % 8) for gsi in range(16)]
    return routes


class GsiRouter:
    """Owns KVM's GSI routing table: the irqchip defaults plus one route per
    MSI vector, each fed by an irqfd."""

    def __init__(self, vm, max_gsi: int = 4096):
        self.vm = vm
        self.max_gsi = max_gsi
        self._next = FIRST_MSI_GSI
        self._msi: dict[int, tuple[int, int]] = {}
        self._lock = threading.Lock()

    def allocate(self) -> int:
        with self._lock:
            if self._next >= self.max_gsi:
                raise RuntimeError("out of GSIs for MSI vectors")
            gsi = self._next
            self._next += 1
            return gsi

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        with self._lock:
            if self._msi.get(gsi) == (address, data):
                return
            self._msi[gsi] = (address, data)
            self.vm.set_gsi_routing(default_routes() + [("msi", g, a, d) for g, (a, d) in self._msi.items()])


class MsiVector:
    """One MSI(-X) vector: an eventfd wired to its own GSI with an irqfd.
    ``fire`` (or a write to ``fd`` from any thread, C included) interrupts."""

    def __init__(self, router: GsiRouter):
        self.router = router
        self.gsi = router.allocate()
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.routed = False
        router.vm.irqfd(self.fd, self.gsi)

    def route(self, address: int, data: int) -> None:
        self.router.set_msi(self.gsi, address, data)
        self.routed = True

    def fire(self) -> None:
        if self.routed:
            os.eventfd_write(self.fd, 1)

    def close(self) -> None:
        try:
            self.router.vm.irqfd(self.fd, self.gsi, deassign=True)
        except OSError:
            pass
        os.close(self.fd)
