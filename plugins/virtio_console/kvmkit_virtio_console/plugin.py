"""kvmkit plugin: the ``virtio-console`` device kind.

Wires :class:`~.console.VirtioConsole` to its host ends: port 0 (the
guest's ``hvc0``) to ``backend``/``path``, and each entry of ``ports``
(``NAME=BACKEND[:PATH]``) to a named port.
"""
from __future__ import annotations

import threading
from pathlib import Path

from kvmkit.plugin_api import (QUEUE_KEY, DeviceConfig, DeviceContext, DeviceError, DevicePlugin,
                               DeviceSpec, Key)

from . import backends as b
from .console import PortSetup, VirtioConsole
from .multiport import NAME_LIMIT

KIND = "virtio-console"
CONSOLE_BACKENDS = ("stdio", "file", "socket", "none")
PORT_BACKENDS = ("stdout", "stderr", "stdin", "stdio", "file", "socket", "feed", "none")
NEEDS_PATH = ("file", "socket", "feed")
MAX_PORTS = 31

SPEC = DeviceSpec(
    kind=KIND,
    summary="virtio console: hvc0 and named ports (multiport), faster than a UART for bulk output",
    keys=(
        Key("backend", str, "stdio", "host end of the console port hvc0", choices=CONSOLE_BACKENDS),
        Key("path", Path, None, "the log file (backend file) or UNIX socket (backend socket)"),
        Key("ports", list, (),
            "named ports, each \"NAME=BACKEND[:PATH]\"; BACKEND is stdout, stderr, stdin, "
            "stdio, file, socket, feed (the guest reads PATH, then end-of-file) or none; "
            "a relative PATH is relative to the working directory"),
        Key("multiport", bool, True,
            "offer VIRTIO_CONSOLE_F_MULTIPORT (needed for named ports)"),
        QUEUE_KEY,
    ),
)

_stdin_lock = threading.Lock()
_stdin_owner: list[str] = []


def parse_port(text: str, where: str) -> tuple[str, str, Path | None]:
    """``NAME=BACKEND[:PATH]`` -> (name, backend, path)."""
    name, sep, rest = text.partition("=")
    backend, _, path = rest.partition(":")
    if not sep or not name:
        raise DeviceError(f"{where}: ports: {text!r} is not NAME=BACKEND[:PATH] "
                          "(e.g. \"org.example.log=file:log.txt\")")
    if len(name.encode()) > NAME_LIMIT or any(c in name for c in "\0/") or not name.isprintable():
        raise DeviceError(f"{where}: ports: port name {name!r} must be printable, without '/', "
                          f"at most {NAME_LIMIT} bytes")
    if backend not in PORT_BACKENDS:
        raise DeviceError(f"{where}: ports: {name}: backend {backend!r} is not one of "
                          f"{', '.join(PORT_BACKENDS)}")
    if backend in NEEDS_PATH and not path:
        raise DeviceError(f"{where}: ports: {name}: backend {backend} needs a path "
                          f"({name}={backend}:PATH)")
    if backend not in NEEDS_PATH and path:
        raise DeviceError(f"{where}: ports: {name}: backend {backend} takes no path")
    return name, backend, (Path(path).absolute() if path else None)


class _Link:
    """A port's device end for its backend's threads (takes the device lock)."""

    def __init__(self, ctx: DeviceContext, port: int):
        self._ctx, self.port = ctx, port
        self.model: VirtioConsole | None = None

    def room(self) -> int:
        with self._ctx.lock:
            return self.model.input_room(self.port)

    def feed(self, data: bytes) -> None:
        with self._ctx.lock:
            self.model.feed(self.port, data)

    def connected(self, flag: bool) -> None:
        with self._ctx.lock:
            self.model.host_connected(self.port, flag)

    def output_room(self) -> None:
        self.model.output_ready(self.port)


class ConsoleDevice:
    """A virtio console wired to its host ends."""

    def __init__(self, config: DeviceConfig, ctx: DeviceContext, *,
                 stdio_fds: tuple[int, int, int] = (0, 1, 2)):
        where = config.where or ctx.name
        backend, path = config["backend"], config["path"]
        if backend in ("file", "socket") and path is None:
            raise DeviceError(f"{where}: backend {backend!r} needs path = \"...\"")
        if backend not in ("file", "socket") and path is not None:
            raise DeviceError(f"{where}: path is only used with backend \"file\" or \"socket\"")
        ports = [parse_port(text, where) for text in config["ports"]]
        if len(ports) + 1 > MAX_PORTS:
            raise DeviceError(f"{where}: ports: at most {MAX_PORTS - 1} named ports")
        names = [name for name, _, _ in ports]
        if len(set(names)) != len(names):
            raise DeviceError(f"{where}: ports: a port name appears twice")
        if ports and not config["multiport"]:
            raise DeviceError(f"{where}: named ports need multiport = true")
        self._ctx = ctx
        self._stdin_claimed = False
        self.backends: list = []
        setups = []
        try:
            plan = [("", backend, path, True)] + [(n, k, p, False) for n, k, p in ports]
            for i, (name, kind, p, console) in enumerate(plan):
                link = _Link(ctx, i)
                end = self._backend(kind, p, link, f"{ctx.name}:{name or 'hvc0'}", console,
                                    stdio_fds, where)
                self.backends.append((link, end))
                setups.append(PortSetup(name, console, end,
                                        end.connected_at_start if end is not None else False))
            self.model = VirtioConsole(setups, multiport=config["multiport"], log=ctx.log,
                                       on_input_room=self._input_room)
            for link, _ in self.backends:
                link.model = self.model
            ctx.add_virtio(self.model, queue=config["queue"])
        except BaseException:
            self.close()
            raise

    def _backend(self, kind, path, link, label, console, fds, where):
        in_fd, out_fd, err_fd = fds
        if kind in ("stdio", "stdin"):
            self._claim_stdin(label, where)
        if kind == "stdio":
            return b.FdBackend(self._ctx, link, label, out_fd=out_fd, in_fd=in_fd, raw=console)
        if kind == "stdout":
            return b.FdBackend(self._ctx, link, label, out_fd=out_fd)
        if kind == "stderr":
            return b.FdBackend(self._ctx, link, label, out_fd=err_fd)
        if kind == "stdin":
            return b.FdBackend(self._ctx, link, label, in_fd=in_fd)
        if kind == "file":
            return b.FdBackend(self._ctx, link, label, out_fd=b.open_log(self._ctx, path, label),
                               owns_out=True)
        if kind == "socket":
            return b.SocketBackend(self._ctx, link, label, path, console=console)
        if kind == "feed":
            return b.FeedBackend(self._ctx, link, label, path)
        return None                                          # none: nothing on the host side

    def _claim_stdin(self, label: str, where: str) -> None:
        with _stdin_lock:
            if _stdin_owner:
                raise DeviceError(f"{where}: {label} and {_stdin_owner[0]} both read stdin; "
                                  "give one of them another backend")
            _stdin_owner.append(label)
            self._stdin_claimed = True

    def _input_room(self, port: int) -> None:
        end = self.backends[port][1]
        if end is not None:
            end.notify_room()

    def start(self) -> None:
        for _, end in self.backends:
            if end is not None:
                end.start()

    def close(self) -> None:
        for _, end in self.backends:
            if end is not None:
                try:
                    end.close()
                except Exception:
                    self._ctx.log.exception("closing a port backend failed")
        self.backends = [(link, None) for link, _ in self.backends]
        if self._stdin_claimed:
            with _stdin_lock:
                _stdin_owner.clear()
            self._stdin_claimed = False
        model = getattr(self, "model", None)
        if model is not None:
            for name, s in model.stats().items():
                if s["out"] or s["in"] or s["dropped_out"]:
                    self._ctx.log.info("%s: %d bytes out, %d in, %d dropped", name, s["out"],
                                       s["in"], s["dropped_out"])


plugin = DevicePlugin(SPEC, ConsoleDevice)
