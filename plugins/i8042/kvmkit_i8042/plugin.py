"""kvmkit plugin: the ``i8042`` device kind (PS/2 controller, keyboard, reset line)."""
from __future__ import annotations

from kvmkit.plugin_api import PIO, DeviceConfig, DeviceContext, DeviceSpec, Key, DevicePlugin

from .controller import I8042

KIND = "i8042"
DATA_PORT = 0x60
STATUS_PORT = 0x64          # 0x61-0x63 belong to other devices

SPEC = DeviceSpec(
    kind=KIND,
    summary="i8042 PS/2 controller with a keyboard; a guest reset through it stops the VM",
    keys=(
        Key("irq", int, 1, "ISA IRQ of the keyboard", min=0, max=23),
        Key("aux_irq", int, 12, "ISA IRQ of the (empty) mouse port", min=0, max=23),
    ),
)


class _DataPort:
    def __init__(self, controller: I8042):
        self._c = controller

    def read(self, offset: int, size: int) -> int:
        return self._c.read_data()

    def write(self, offset: int, size: int, value: int) -> None:
        self._c.write_data(value & 0xFF)


class _StatusPort:
    def __init__(self, controller: I8042):
        self._c = controller

    def read(self, offset: int, size: int) -> int:
        return self._c.read_status()

    def write(self, offset: int, size: int, value: int) -> None:
        self._c.write_command(value & 0xFF)


# Scan code set 1: Ctrl, Alt, Delete (extended) pressed, then released in reverse.
CTRL_ALT_DEL = bytes([0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D])


class KeyboardController:
    def __init__(self, config: DeviceConfig, ctx: DeviceContext):
        self._ctx = ctx
        self.controller = I8042(ctx.irq(config["irq"]), ctx.irq(config["aux_irq"]),
                                reset=lambda: ctx.request_stop("guest reset (i8042)", 0))
        ctx.add_io(PIO, DATA_PORT, 1, _DataPort(self.controller))
        ctx.add_io(PIO, STATUS_PORT, 1, _StatusPort(self.controller))
        ctx.on_shutdown_request(self.ctrl_alt_del)
        self.irq = config["irq"]

    def acpi_node(self, aml) -> bytes:
        """The keyboard as a PNP0303 device in the guest's DSDT, so that an ACPI
        guest finds the controller (its ports, the keyboard IRQ)."""
        irq = aml.irq_no_flags(self.irq) if self.irq < 16 else aml.interrupt(self.irq, edge=True)
        return aml.device("PS2K",
                          aml.name("_HID", aml.eisaid("PNP0303")),
                          aml.name("_CRS", aml.resource_template(aml.io(DATA_PORT, 1), aml.io(STATUS_PORT, 1),
                                                                 irq)))

    def ctrl_alt_del(self) -> None:
        """The graceful stop: Linux restarts on Ctrl-Alt-Del (or tells init)."""
        self.send_key(CTRL_ALT_DEL)

    def send_key(self, scancodes: bytes) -> bool:
        """Type a key event into the guest (from any thread)."""
        with self._ctx.lock:
            return self.controller.send_key(scancodes)

    # -- snapshots (kvmkit.device_state; called with the VM paused) ---------------------
    def snapshot_state(self) -> dict:
        return self.controller.snapshot_state()

    def restore_state(self, state: dict) -> None:
        self.controller.restore_state(state)

    def start(self) -> None:
        """Nothing runs on its own: the controller only answers the guest."""

    def close(self) -> None:
        """No host resources to release."""


plugin = DevicePlugin(SPEC, KeyboardController)
