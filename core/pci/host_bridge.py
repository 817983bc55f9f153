"""PCI bus 0 behind configuration mechanism #1 (ports 0xCF8 and 0xCFC-0xCFF).

CONFIG_ADDRESS (0xCF8, 32 bits): bit 31 enable, bits 23:16 bus, 15:11
device, 10:8 function, 7:2 register; bits 30:24 and 1:0 read as 0.  Only a
32-bit write at 0xCF8 latches it; narrower writes there are ignored (Linux's
probe for mechanism #1 relies on exactly that).  CONFIG_DATA (0xCFC-0xCFF)
accesses register ``(CONFIG_ADDRESS & 0xFC) + (port - 0xCFC)`` of the selected
function with the access's own size.  With the enable bit clear, or for a
bus, device or function that does not exist, reads return all-ones and
writes are dropped.

A byte access at 0xCF9 is not CONFIG_ADDRESS but the chipset's reset control
register (as on Intel chipsets): it goes to ``PciHost.reset_control`` when the
machine set one (see kvmkit.chipset).
"""
from __future__ import annotations

import contextlib

from .config_space import ConfigSpace

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_DATA_PORT = 0xCFC
PORT_SIZE = 4                  # each handler covers four ports
RESET_CONTROL_OFFSET = 1       # 0xCF9, byte-wide: the chipset's reset control register
MAX_DEVICES = 32

CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FF_FFFC    # reserved bits 30:24 and 1:0 read as 0

CLASS_BRIDGE_HOST = 0x060000

# The host bridge at 00:00.0.  Red Hat's vendor ID 0x1b36 is the one
# registered for virtual hardware, and 0x1b36:0x0008 is listed in pci.ids as
# "QEMU PCIe Host bridge", so lspci names it and no guest treats it as real
# silicon: Intel IDs would match chipset-specific quirks in Linux that probe
# registers we do not emulate.  Class 0x060000 (host bridge) is what Linux's
# mechanism #1 sanity check looks for on bus 0.
HOST_BRIDGE_VENDOR_ID = 0x1B36
HOST_BRIDGE_DEVICE_ID = 0x0008


class PciBusFull(Exception):
    """All 32 device numbers of bus 0 are taken."""


class HostBridge:
    """The function at 00:00.0: a header and nothing else."""

    def __init__(self) -> None:
        self.config = ConfigSpace(HOST_BRIDGE_VENDOR_ID, HOST_BRIDGE_DEVICE_ID, CLASS_BRIDGE_HOST,
                                  subsystem_vendor_id=HOST_BRIDGE_VENDOR_ID)


class _AddressPort:
    """PIO handler for 0xCF8-0xCFB."""

    def __init__(self, host: PciHost):
        self._host = host

    def read(self, offset: int, size: int) -> int:
        if offset == RESET_CONTROL_OFFSET and size == 1 and self._host.reset_control is not None:
            return self._host.reset_control.read(0, 1)
        return (self._host.address >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == RESET_CONTROL_OFFSET and size == 1 and self._host.reset_control is not None:
            self._host.reset_control.write(0, 1, value)
        elif offset == 0 and size == 4:
            self._host.address = value & CONFIG_ADDRESS_MASK


class _DataPort:
    """PIO handler for 0xCFC-0xCFF."""

    def __init__(self, host: PciHost):
        self._host = host

    def read(self, offset: int, size: int) -> int:
        target = self._host._selected(offset)
        if target is None:
            return (1 << (8 * size)) - 1
        config, register, lock = target
        with lock:
            return config.read(register, size)

    def write(self, offset: int, size: int, value: int) -> None:
        target = self._host._selected(offset)
        if target is not None:
            config, register, lock = target
            with lock:
                config.write(register, size, value)


class PciHost:
    """Bus 0: up to 32 single-function devices, the host bridge at device 0.

    Register ``address_port`` at :data:`CONFIG_ADDRESS_PORT` and ``data_port``
    at :data:`CONFIG_DATA_PORT`, each :data:`PORT_SIZE` ports long (see
    :meth:`pio_ranges`).
    """

    def __init__(self) -> None:
        self.bridge = HostBridge()
        self._slots: list = [None] * MAX_DEVICES
        self._slots[0] = self.bridge
        self.address = 0                  # the latched CONFIG_ADDRESS
        self.reset_control = None         # byte accesses at 0xCF9 (read/write(offset, size[, value]))
        self.address_port = _AddressPort(self)
        self.data_port = _DataPort(self)

    def pio_ranges(self) -> list[tuple[int, int, object]]:
        """(base, size, handler) for each port range to put on the PIO bus."""
        return [(CONFIG_ADDRESS_PORT, PORT_SIZE, self.address_port),
                (CONFIG_DATA_PORT, PORT_SIZE, self.data_port)]

    def add(self, function) -> int:
        """Put ``function`` (anything with a ``config`` ConfigSpace, and
        optionally a ``lock`` held around its config accesses) in the lowest
        free device number and return that number."""
        if not isinstance(getattr(function, "config", None), ConfigSpace):
            raise TypeError(f"{function!r} has no 'config' ConfigSpace")
        if any(f is function for f in self._slots):
            raise ValueError(f"{function!r} is already on the bus")
        for number, slot in enumerate(self._slots):
            if slot is None:
                self._slots[number] = function
                return number
        raise PciBusFull(f"PCI bus 0 has no free device number: all {MAX_DEVICES} are in use")

    def function(self, device: int):
        """The function at device number ``device`` (0 is the host bridge), or None."""
        return self._slots[device] if 0 <= device < MAX_DEVICES else None

    def functions(self) -> list[tuple[int, object]]:
        """(device_number, function) for every function added with :meth:`add`,
        by device number; the host bridge is not included."""
        return [(n, f) for n, f in enumerate(self._slots) if f is not None and f is not self.bridge]

    def interrupt_pins(self) -> list[tuple[int, int]]:
        """(device_number, interrupt pin 1-4) of each function that uses INTx,
        for the MP table's bus-0 interrupt entries."""
        return [(n, f.config.interrupt_pin) for n, f in self.functions() if f.config.interrupt_pin]

    # -- configuration accesses ------------------------------------------------------------
    def config_for(self, bus: int, device: int, function: int) -> ConfigSpace | None:
        if bus != 0 or function != 0:
            return None
        slot = self.function(device)
        return None if slot is None else slot.config

    def _selected(self, offset: int) -> tuple[ConfigSpace, int] | None:
        address = self.address
        if not address & CONFIG_ADDRESS_ENABLE:
            return None
        bus, device, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        config = self.config_for(bus, device, function)
        if config is None:
            return None
        # A function with a ``lock`` (its device's lock) gets config accesses
        # serialised with everything else that touches the device.
        lock = getattr(self.function(device), "lock", None) or contextlib.nullcontext()
        return config, (address & 0xFC) + offset, lock
