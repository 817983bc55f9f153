"""kvmkit plugin: the ``serial8250`` device kind (a 16550A UART)."""
from __future__ import annotations

from pathlib import Path

from kvmkit.plugin_api import PIO, DeviceConfig, DeviceContext, DeviceError, DeviceSpec, Key, DevicePlugin

from .backends import FileBackend, SocketBackend, StdioBackend
from .uart import Uart16550

KIND = "serial8250"
STANDARD_IRQS = {0x3F8: 4, 0x2F8: 3, 0x3E8: 4, 0x2E8: 3}
STANDARD_UIDS = {0x3F8: 0, 0x2F8: 1, 0x3E8: 2, 0x2E8: 3}     # COM1-COM4; other ports use the port
PORT_COUNT = 8
INPUT_LIMIT = 4096          # host bytes held for a guest that is not reading

SPEC = DeviceSpec(
    kind=KIND,
    summary="16550A UART (serial console) on the ISA I/O ports",
    keys=(
        Key("port", int, 0x3F8, "first of its 8 I/O ports", min=0, max=0x10000 - PORT_COUNT),
        Key("irq", int, None, "ISA IRQ; default: 4 for 0x3f8/0x3e8, 3 for 0x2f8/0x2e8",
            min=0, max=23),
        Key("backend", str, "stdio", "host end of the console",
            choices=("stdio", "file", "socket")),
        Key("path", Path, None, "the log file (backend file) or UNIX socket (backend socket)"),
    ),
)


def irq_for(port: int, irq: int | None, where: str = KIND) -> int:
    if irq is not None:
        return irq
    try:
        return STANDARD_IRQS[port]
    except KeyError:
        raise DeviceError(f"{where}: port {port:#x} has no standard IRQ; set irq = N "
                          "(0x3f8 and 0x3e8 use 4, 0x2f8 and 0x2e8 use 3)") from None


class SerialPort:
    """A UART wired to its host backend.  Also the backend's input sink."""

    def __init__(self, config: DeviceConfig, ctx: DeviceContext, *,
                 stdio_fds: tuple[int, int] = (0, 1)):
        where = config.where or ctx.name
        port = config["port"]
        irq = irq_for(port, config["irq"], where)
        backend, path = config["backend"], config["path"]
        if backend in ("file", "socket") and path is None:
            raise DeviceError(f"{where}: backend {backend!r} needs path = \"...\"")
        if backend == "stdio" and path is not None:
            raise DeviceError(f"{where}: path is only used with backend \"file\" or \"socket\"")
        self._ctx = ctx
        self.port, self.irq = port, irq
        self.uart = Uart16550(ctx.irq(irq), self._output, self._input_drained)
        ctx.add_io(PIO, port, PORT_COUNT, self.uart)
        if backend == "file":
            self.backend = FileBackend(ctx, path)
        elif backend == "socket":
            self.backend = SocketBackend(ctx, self, path)
        else:
            self.backend = StdioBackend(ctx, self, *stdio_fds)

    # -- the UART's callbacks (device lock held) -------------------------------------------
    def _output(self, data: bytes) -> None:
        self.backend.write(data)

    def _input_drained(self) -> None:
        self.backend.notify_room()

    # -- InputSink (backend threads) ---------------------------------------------------
    def room(self) -> int:
        with self._ctx.lock:
            return INPUT_LIMIT - self.uart.pending_input

    def feed(self, data: bytes) -> None:
        with self._ctx.lock:
            self.uart.feed(data)

    # -- ACPI ----------------------------------------------------------------------------
    def acpi_node(self, aml) -> bytes:
        """The port as a PNP0501 device in the guest's DSDT (its ports, its IRQ)."""
        uid = STANDARD_UIDS.get(self.port, self.port)
        irq = aml.irq_no_flags(self.irq) if self.irq < 16 else aml.interrupt(self.irq, edge=True)
        return aml.device(f"S{self.port & 0xFFF:03X}",
                          aml.name("_HID", aml.eisaid("PNP0501")),
                          aml.name("_UID", uid),
                          aml.name("_CRS", aml.resource_template(aml.io(self.port, PORT_COUNT), irq)))

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.backend.start()

    def close(self) -> None:
        self.backend.close()


plugin = DevicePlugin(SPEC, SerialPort)
