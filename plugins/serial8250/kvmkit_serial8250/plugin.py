"""kvmkit plugin: the ``serial8250`` device kind (a 16550A UART)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from kvmkit.plugin_api import PIO, DeviceConfig, DeviceContext, DeviceError, DeviceSpec, Key, DevicePlugin

from .backends import FileBackend, SocketBackend, StdioBackend
from .uart import Uart16550

KIND = "serial8250"
STANDARD_IRQS = {0x3F8: 4, 0x2F8: 3, 0x3E8: 4, 0x2E8: 3}
STANDARD_UIDS = {0x3F8: 0, 0x2F8: 1, 0x3E8: 2, 0x2E8: 3}     # COM1-COM4; other ports use the port
PORT_COUNT = 8
INPUT_LIMIT = 4096          # host bytes held for a guest that is not reading
SUN_PATH_MAX = 107          # bytes of a UNIX socket path

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


def backend_problem(backend: str, path: Path | None) -> str | None:
    if backend in ("file", "socket") and path is None:
        return f"backend {backend!r} needs path = \"...\""
    if backend == "stdio" and path is not None:
        return "path is only used with backend \"file\" or \"socket\""
    return None


def _host_problem(backend: str, path: Path) -> str | None:
    """Whether the host end can be had, without creating it."""
    parent = path.parent
    if not parent.is_dir():
        return f"path: the directory {parent} does not exist"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        return f"path: cannot use {path}: {e.strerror}"
    if backend == "file":
        if st is not None and stat.S_ISDIR(st.st_mode):
            return f"path: {path} is a directory; name the console log file"
        if not os.access(path if st is not None else parent, os.W_OK):
            return f"path: cannot write {path if st is not None else parent}"
    else:
        if len(os.fsencode(path)) > SUN_PATH_MAX:
            return (f"path: {path} is {len(os.fsencode(path))} bytes, over the {SUN_PATH_MAX} "
                    "a UNIX socket path allows; choose a shorter one")
        if st is not None and not stat.S_ISSOCK(st.st_mode):
            return f"path: {path} exists and is not a socket; remove it or choose another path"
    return None


def check(config: DeviceConfig, devices) -> list[str]:
    """``kvmkit_check_device``: keys, the host end, and clashes with the
    serial ports before this one (one terminal, one port range, one path)."""
    problems = []
    port, backend, path = config["port"], config["backend"], config["path"]
    try:
        irq_for(port, config["irq"], "")
    except DeviceError as e:
        problems.append(str(e).removeprefix(": "))
    problem = backend_problem(backend, path)
    if problem is None and path is not None:
        problem = _host_problem(backend, path)
    if problem:
        problems.append(problem)
    for other in devices:
        if other is config:
            break
        if other.kind != KIND:
            continue
        if abs(other["port"] - port) < PORT_COUNT:
            problems.append(f"ports {port:#x}-{port + PORT_COUNT - 1:#x} overlap those of "
                            f"{other.table} ({other['port']:#x}); give each port its own port = "
                            "(0x3f8, 0x2f8, 0x3e8, 0x2e8)")
        if backend == "stdio" and other["backend"] == "stdio":
            problems.append(f"{other.table} already uses the stdio backend (the terminal); give "
                            "this one backend = \"file\" or \"socket\"")
        if path is not None and other["path"] is not None and Path(other["path"]) == Path(path):
            problems.append(f"path {path} is also {other.table}'s; give each port its own")
    return problems


class SerialPort:
    """A UART wired to its host backend.  Also the backend's input sink."""

    def __init__(self, config: DeviceConfig, ctx: DeviceContext, *,
                 stdio_fds: tuple[int, int] = (0, 1)):
        where = config.where or ctx.name
        port = config["port"]
        irq = irq_for(port, config["irq"], where)
        backend, path = config["backend"], config["path"]
        problem = backend_problem(backend, path)
        if problem:
            raise DeviceError(f"{where}: {problem}")
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

    # -- snapshots (kvmkit.device_state; called with the VM paused) ---------------------
    def snapshot_state(self) -> dict:
        return self.uart.snapshot_state()

    def restore_state(self, state: dict) -> None:
        self.uart.restore_state(state)

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


plugin = DevicePlugin(SPEC, SerialPort, check)
