"""The terminal of a detached VM, and `kvmkit console` that attaches to it.

A detached VM runs with a pseudo-terminal as its standard input and output,
so whatever device uses stdio (a serial console) behaves as on a terminal.
:class:`ConsoleRelay` bridges the pty's master side to a UNIX socket
(``<runtime dir>/<name>.console``, owner-only), one client at a time; what
the guest prints while nobody is attached is kept (the last 64 KiB) and
replayed on attach.  :func:`attach` is the client: Ctrl-] detaches.
"""
from __future__ import annotations

import collections
import os
import select
import socket
import sys
import termios
import threading
import tty

from .control import ControlError, console_path, listen

BACKLOG = 64 << 10
DETACH = 0x1D                      # Ctrl-]


class ConsoleRelay:
    def __init__(self, master_fd: int, name: str):
        self.master = master_fd
        self.path = console_path(name)
        self.sock = listen(self.path, "console socket")
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_size = 0
        self.client: socket.socket | None = None
        self._stop_r, self._stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, name="console-relay", daemon=True)
        self.thread.start()

    def _keep(self, data: bytes) -> None:
        self.backlog.append(data)
        self.backlog_size += len(data)
        while self.backlog_size > BACKLOG:
            self.backlog_size -= len(self.backlog.popleft())

    def _drop_client(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _run(self) -> None:
        while True:
            fds = [self.master, self.sock, self._stop_r] + ([self.client] if self.client else [])
            ready, _, _ = select.select(fds, [], [])
            if self._stop_r in ready:
                return
            if self.sock in ready:
                conn, _ = self.sock.accept()
                if self.client is not None:
                    conn.sendall(b"kvmkit: another console client is attached\r\n")
                    conn.close()
                else:
                    self.client = conn
                    conn.sendall(b"".join(self.backlog))
            if self.master in ready:
                try:
                    data = os.read(self.master, 4096)
                except OSError:
                    return
                if not data:
                    return
                self._keep(data)
                if self.client is not None:
                    try:
                        self.client.sendall(data)
                    except OSError:
                        self._drop_client()
            if self.client is not None and self.client in ready:
                data = self.client.recv(4096)
                if not data:
                    self._drop_client()
                else:
                    os.write(self.master, data)

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self.thread.join(timeout=2)
        self._drop_client()
        self.sock.close()
        self.path.unlink(missing_ok=True)
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)


def attach(name: str) -> int:
    """Relay this terminal to VM ``name``'s console until Ctrl-] or the VM ends."""
    path = console_path(name)
    if not path.exists():
        raise ControlError(f"VM {name!r} has no console socket: only VMs started with "
                           "`kvmkit run --detach` have one (see kvmkit list)")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
    except OSError:
        raise ControlError(f"cannot attach to {name!r}: its console socket does not answer") from None
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    if saved is not None:
        tty.setraw(stdin)
        os.write(stdout, f"kvmkit: attached to {name} (Ctrl-] detaches)\r\n".encode())
    try:
        while True:
            ready, _, _ = select.select([stdin, s], [], [])
            if s in ready:
                data = s.recv(4096)
                if not data:
                    return 0
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data:
                    return 0
                if DETACH in data:
                    s.sendall(data[:data.index(DETACH)])
                    return 0
                s.sendall(data)
    finally:
        s.close()
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
            os.write(stdout, b"\r\nkvmkit: detached\r\n")
