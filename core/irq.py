"""Interrupt lines: GSIs of the in-kernel IOAPIC/PIC, raised with KVM_IRQ_LINE."""
from __future__ import annotations

import threading


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
