"""The terminal of a detached VM, and `kvmkit console` that attaches to it.

A detached VM runs with a pseudo-terminal as its standard input and output,
so whatever device uses stdio (a serial console) behaves as on a terminal.
:class:`ConsoleRelay` bridges the pty's master side to a UNIX socket
(``<runtime dir>/<name>.console``, owner-only), one client at a time; what
the guest prints while nobody is attached is kept (the last 64 KiB) and
replayed on attach.  :func:`attach` is the client: Ctrl-] detaches.

The relay never waits on either side: a client that stops reading gets at
most ``CLIENT_LIMIT`` bytes queued (then it is dropped: the backlog replays
on its next attach), one that vanishes (reset, broken pipe) is dropped, and
input for a guest whose terminal is full is dropped and counted, so the pty
is always read and the guest's console never fills up.  When the process is
out of descriptors, attaching waits until one is free (the relay goes on).
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
from .host_socket import Acceptor

BACKLOG = 64 << 10
CLIENT_LIMIT = 256 << 10           # output queued for a client that does not read
DETACH = 0x1D                      # Ctrl-]


class ConsoleRelay:
    def __init__(self, master_fd: int, name: str):
        self.master = master_fd
        self.path = console_path(name)
        self.sock = listen(self.path, "console socket")
        self.backlog: collections.deque[bytes] = collections.deque()
        self.backlog_size = 0
        self.client: socket.socket | None = None
        self._to_client = bytearray()
        self.input_dropped = 0             # client input the guest's terminal had no room for
        os.set_blocking(master_fd, False)
        self.sock.setblocking(False)
        self.acceptor = Acceptor(self.sock, f"console socket {self.path}")
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
        self._to_client.clear()

    def _send_client(self, data: bytes = b"") -> None:
        """Queue ``data`` for the client and send what its socket takes now."""
        self._to_client += data
        if len(self._to_client) > CLIENT_LIMIT:     # it stopped reading: let it go
            self._drop_client()
            return
        while self._to_client:
            try:
                n = self.client.send(self._to_client)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop_client()
                return
            del self._to_client[:n]

    def _accept(self) -> None:
        conn = self.acceptor.accept()
        if conn is None:
            return
        conn.setblocking(False)
        if self.client is not None:
            try:
                conn.send(b"kvmkit: another console client is attached\r\n")
            except OSError:
                pass
            conn.close()
            return
        self.client = conn
        self._send_client(b"".join(self.backlog))

    def _to_guest(self, data: bytes) -> None:
        try:
            n = os.write(self.master, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            n = len(data)
        self.input_dropped += len(data) - n

    def _run(self) -> None:
        while True:
            client = self.client
            fds = [self.master, self._stop_r] + ([client] if client else [])
            if self.acceptor.wanted():
                fds.append(self.sock)
            wfds = [client] if client is not None and self._to_client else []
            ready, writable, _ = select.select(fds, wfds, [], self.acceptor.timeout())
            if self._stop_r in ready:
                return
            if self.sock in ready:
                self._accept()
            if client is not None and client in writable and self.client is client:
                self._send_client()
            if self.master in ready:
                try:
                    data = os.read(self.master, 4096)
                except (BlockingIOError, InterruptedError):
                    data = None
                except OSError:
                    return
                if data is not None:
                    if not data:
                        return
                    self._keep(data)
                    if self.client is not None:
                        self._send_client(data)
            if client is not None and client in ready and self.client is client:
                try:
                    data = client.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:                    # reset by a client that died
                    data = b""
                if not data:
                    self._drop_client()
                else:
                    self._to_guest(data)

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
