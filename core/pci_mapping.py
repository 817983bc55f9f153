"""Keep a PCI function's BARs on the buses where the guest put them.

Called after every config-space change: a BAR is mapped while its decode bit
(memory or I/O) is on, at the address the guest (or the "firmware"
assignment) gave it; a move unmaps the old range first.  ``on_map`` and
``on_unmap`` let the owner follow along (the virtio runtime moves its
ioeventfds).
"""
from __future__ import annotations

import logging
import types
from typing import Callable, Mapping

from .bus import BusConflict
from .guest_log import GuestLog

log = logging.getLogger("kvmkit.pci")

PCI_INTX_GSIS = tuple(range(16, 24))     # IOAPIC pins above the ISA ones, shared round-robin


def intx_gsi(slot: int) -> int:
    """The GSI that INTx of bus-0 device ``slot`` raises (the MP table says so too)."""
    return PCI_INTX_GSIS[slot % len(PCI_INTX_GSIS)]


class BarMapper:
    def __init__(self, machine, owner: str, lock, config, handlers: Mapping[int, object],
                 on_map: Callable[[int, int], None] | None = None,
                 on_unmap: Callable[[int, int], None] | None = None):
        self.machine = machine
        self.owner = owner
        self.glog = GuestLog(log)      # BAR conflicts the guest programs, rate-limited
        self.lock = lock
        self.config = config
        self.handlers = dict(handlers)
        self.on_map = on_map or (lambda index, base: None)
        self.on_unmap = on_unmap or (lambda index, base: None)
        self.mapped: dict[int, int] = {}            # BAR index -> mapped base

    def _bus(self, index: int):
        return self.machine.mmio if self.config.bar(index).is_memory else self.machine.pio

    def remap(self, _event=None) -> None:
        want = {bar.index: bar.address for bar in self.config.decoded_bars()
                if bar.index in self.handlers}
        for index, base in list(self.mapped.items()):
            if want.get(index) != base:
                self._bus(index).remove(base, self.owner)
                del self.mapped[index]
                self.on_unmap(index, base)
        for index, base in want.items():
            if index in self.mapped:
                continue
            size = self.config.bar(index).size
            try:
                self._bus(index).add(base, size, self.handlers[index], self.lock, self.owner)
            except BusConflict as e:
                self.glog.warning(("conflict", index), "%s: BAR %d not mapped: %s", self.owner, index, e)
                continue
            self.mapped[index] = base
            self.on_map(index, base)

    def unmap_all(self) -> None:
        for index, base in list(self.mapped.items()):
            self._bus(index).remove(base, self.owner)
            self.on_unmap(index, base)
        self.mapped.clear()


def add_function(machine, ctx, config, handlers: Mapping[int, object],
                 on_map=None, on_unmap=None) -> tuple[int, BarMapper]:
    """Put a PCI function (its ConfigSpace and a handler per BAR) on bus 0:
    device number, interrupt line, "firmware" BAR assignment, and BARs that
    follow the guest.  The PCI host holds ``ctx.lock`` around config accesses."""
    mapper = BarMapper(machine, ctx.name, ctx.lock, config, handlers, on_map, on_unmap)
    slot = machine.pci.add(types.SimpleNamespace(config=config, lock=ctx.lock))
    if config.interrupt_pin:
        config.poke(0x3C, bytes([intx_gsi(slot)]))        # interrupt line, as firmware would
    machine.mmio_alloc.assign_bars(config, io=machine.io_alloc)
    config.on_change = mapper.remap
    return slot, mapper
