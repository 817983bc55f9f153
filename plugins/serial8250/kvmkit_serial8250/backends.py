"""Host ends of the serial console: stdio, an append-only file, a UNIX socket.

A backend gets guest output through ``write(data)`` (called from a vCPU
thread with the device lock held, so it never blocks for long) and hands host
input to an :class:`InputSink`, which takes the device lock itself.  Pipes,
files and sockets are read only while the sink has room, so a guest that does
not read applies back-pressure to the host side instead of losing bytes.  A
terminal is always read, so that its escapes work whatever the guest does;
what the guest has no room for is held (up to ``HELD_LIMIT`` bytes).

Output never blocks the vCPU: standard output goes through
:class:`NonBlockingOutput`, which keeps up to ``OUT_LIMIT`` bytes while the
terminal, pipe or pseudo-terminal is full (nobody reads it: a detached VM
whose console client left) and drops and counts the rest.
"""
from __future__ import annotations

import atexit
import os
import select
import socket
import stat
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Protocol

from kvmkit.plugin_api import Acceptor, DeviceContext, DeviceError, listen_unix_socket

from .escape import HELP, HELP_TEXT, QUIT, EscapeFilter

POLL_S = 0.2                # how often reader threads look at ctx.stopping
CHUNK = 4096
SOCKET_OUT_LIMIT = 64 * 1024
HELD_LIMIT = 4096           # terminal input kept while the guest reads nothing
OUT_LIMIT = 1 << 20         # output kept while standard output is full (a slow terminal)
CLOSE_FLUSH_S = 2.0         # how long close() waits for standard output to take what is kept


class InputSink(Protocol):
    def room(self) -> int:
        """How many more input bytes the device will take now."""

    def feed(self, data: bytes) -> None:
        """Give input to the device (takes the device lock)."""


def write_all(fd: int, data: bytes, wait_s: float = 1.0) -> bool:
    """Write all of ``data`` to ``fd``; False if the fd failed or stayed full."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:               # a non-blocking terminal shared with others
            if not select.select([], [fd], [], wait_s)[1]:
                return False
            continue
        except OSError:
            return False
        view = view[n:]
    return True


class NonBlockingOutput:
    """Writes to ``fd`` that never wait: what does not fit now is kept (up to
    ``limit`` bytes) for :meth:`flush`, beyond that dropped and counted.

    fd 1 itself stays as it is (O_NONBLOCK on a terminal would reach every
    process sharing it): a terminal, pseudo-terminal or pipe is opened again
    through /proc with O_NONBLOCK (a description of our own), a socket is
    written with MSG_DONTWAIT, and a regular file is written directly (it
    never stays full)."""

    def __init__(self, fd: int, limit: int = OUT_LIMIT):
        self.limit = limit
        self.dropped = 0
        self.failed = False
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._own_fd = -1
        self.fd = fd
        try:
            mode = os.fstat(fd).st_mode
        except OSError:
            mode = 0
        if stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        elif stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            try:
                self._own_fd = os.open(f"/proc/self/fd/{fd}",
                                       os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
                self.fd = self._own_fd
            except OSError:
                pass                              # no /proc: select before each write
        self._blocking = (self._sock is None and self._own_fd < 0
                          and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)))

    @property
    def pending(self) -> int:
        return len(self._buf)

    def _send(self, data) -> int:
        """Bytes of ``data`` written now, without waiting."""
        if self._sock is not None:
            return self._sock.send(data, socket.MSG_DONTWAIT)
        if self._blocking:                        # fallback: write only what surely fits
            if not select.select([], [self.fd], [], 0)[1]:
                return 0
            data = data[:512]
        return os.write(self.fd, data)

    def _write_some(self, data) -> int:
        try:
            return self._send(data)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:                           # the reader went away for good
            self.failed = True
            return len(data)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self.failed:
                return
            if self._buf:
                self._flush_locked()
            if not self._buf:
                n = self._write_some(data)
                data = data[n:]
                if not data:
                    return
            room = self.limit - len(self._buf)
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self._buf += data

    def _flush_locked(self) -> None:
        while self._buf and not self.failed:
            n = self._write_some(self._buf)
            if n <= 0:
                return
            del self._buf[:n]
        if self.failed:
            self._buf.clear()

    def flush(self) -> None:
        """Write what is kept, as far as the sink takes it now."""
        with self._lock:
            self._flush_locked()

    def drain(self, wait_s: float) -> None:
        """Write what is kept, waiting up to ``wait_s`` for the sink; what is
        still kept after that counts as dropped."""
        deadline = time.monotonic() + wait_s
        while self.pending and not self.failed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                select.select([], [self.fd], [], min(left, 0.1))
            except (OSError, ValueError):
                break
            self.flush()
        with self._lock:
            self.dropped += len(self._buf)
            self._buf.clear()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
        if self._own_fd >= 0:
            os.close(self._own_fd)
            self._own_fd = -1


class FileBackend:
    """Guest output appended to a file; no input."""

    def __init__(self, ctx: DeviceContext, path: Path):
        self._ctx = ctx
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise DeviceError(f"{ctx.name}: cannot open {path} for the console log: "
                              f"{e.strerror}") from None
        self._failed = False

    def write(self, data: bytes) -> None:
        if self._failed or self._fd < 0:
            return
        if not write_all(self._fd, data):
            self._failed = True
            self._ctx.log.warning("writing the console log %s failed; dropping further output",
                                  self.path)

    def start(self) -> None:
        """Nothing to read: the file backend has no input."""

    def notify_room(self) -> None:
        """No reader to wake."""

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class _Reader:
    """What the backends with input share: a reader thread, a self-pipe that
    wakes it, and an orderly shutdown."""

    def __init__(self, ctx: DeviceContext, sink: InputSink):
        self._ctx = ctx
        self._sink = sink
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_lock = threading.Lock()
        self._closed = False
        self._thread: threading.Thread | None = None

    def notify_room(self) -> None:
        """The device has room for input again: wake the reader."""
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if not self._closed:
                try:
                    os.write(self._wake_w, b"\0")
                except OSError:                 # full pipe: a wake-up is already pending
                    pass

    def _done(self) -> bool:
        return self._closed or self._ctx.stopping.is_set()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except OSError:
            pass

    def _spawn(self, name: str, target) -> None:
        self._thread = self._ctx.spawn(name, target)

    def close(self) -> None:
        if self._closed:
            return
        self._wake()                            # gets the reader out of select
        with self._wake_lock:
            self._closed = True
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(2.0)
        self._release()
        with self._wake_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)

    def _release(self) -> None:
        """Give back what the backend holds, once its reader has stopped."""


_stdin_claims: set[int] = set()
_stdin_claims_lock = threading.Lock()


class StdioBackend(_Reader):
    """Output to fd 1, input from fd 0.  A terminal is put in raw mode (and
    restored on close, or at exit if the VMM dies first) and gets the Ctrl-A
    escapes; other stdin (a pipe, a file, /dev/null) is read until EOF."""

    def __init__(self, ctx: DeviceContext, sink: InputSink, in_fd: int = 0, out_fd: int = 1):
        with _stdin_claims_lock:
            if in_fd in _stdin_claims:
                raise DeviceError(f"{ctx.name}: another device already uses the stdio backend; "
                                  "give this one backend = \"file\" or \"socket\"")
            _stdin_claims.add(in_fd)
        super().__init__(ctx, sink)
        self._in_fd = in_fd
        self._out_fd = out_fd
        self._saved_tty: list | None = None
        self._escape: EscapeFilter | None = None
        self._held = bytearray()                 # terminal input the guest had no room for
        self.dropped = 0                         # terminal input beyond HELD_LIMIT
        self.out = NonBlockingOutput(out_fd)     # output: never blocks the vCPU

    @property
    def raw_mode(self) -> bool:
        return self._saved_tty is not None

    def write(self, data: bytes) -> None:
        pending = self.out.pending
        self.out.write(data)                    # stdout went away: keep the guest running
        if self.out.pending and not pending:
            self._wake()                        # the reader flushes what is kept

    @property
    def out_dropped(self) -> int:
        """Output bytes dropped because standard output stayed full."""
        return self.out.dropped

    def start(self) -> None:
        if _isatty(self._in_fd):
            self._escape = EscapeFilter()
            try:
                self._saved_tty = termios.tcgetattr(self._in_fd)
                tty.setraw(self._in_fd, termios.TCSANOW)
            except termios.error:
                self._saved_tty = None
            else:
                atexit.register(self._restore_tty)
        self._spawn("stdin", self._read_loop)

    def _read_loop(self) -> None:
        eof = False
        while not self._done():
            room = self._sink.room()
            if self._held and room > 0:          # typed earlier, the guest has room now
                n = min(room, len(self._held))
                self._sink.feed(bytes(self._held[:n]))
                del self._held[:n]
                room -= n
            if eof and not self._held:
                return                           # EOF: the guest gets no more input
            # A terminal is always read, so that Ctrl-A x works even while the
            # guest reads nothing; other input waits until the guest has room.
            readable = not eof and (room > 0 or self._escape is not None)
            fds = [self._wake_r, self._in_fd] if readable else [self._wake_r]
            out = [self.out.fd] if self.out.pending else []
            try:
                ready, writable, _ = select.select(fds, out, [], POLL_S)
            except (OSError, ValueError):        # stdin closed under us
                return
            if writable:
                self.out.flush()
            if self._wake_r in ready:
                self._drain_wake()
            if self._in_fd not in ready or self._done():
                continue
            try:
                data = os.read(self._in_fd, CHUNK if self._escape else min(room, CHUNK))
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                eof = True
            elif self._escape is None:
                self._sink.feed(data)
            else:
                self._typed(data)

    def _typed(self, data: bytes) -> None:
        data, actions = self._escape.process(data)
        for action in actions:
            if action == QUIT:
                self._ctx.request_stop("user quit (Ctrl-A x)", 0)
            elif action == HELP:
                with self._ctx.lock:
                    self.write(HELP_TEXT)
        room = HELD_LIMIT - len(self._held)
        if len(data) > room:                     # typing ahead of a stuck guest
            self.dropped += len(data) - room
        self._held += data[:room]

    def _restore_tty(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            try:
                termios.tcsetattr(self._in_fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass

    def _release(self) -> None:
        self.out.drain(CLOSE_FLUSH_S)
        self.out.close()
        if self.out.dropped:
            self._ctx.log.warning("%s: %d bytes of guest output dropped: standard output stayed "
                                  "full (nobody read it)", self._ctx.name, self.out.dropped)
        self._restore_tty()
        atexit.unregister(self._restore_tty)
        with _stdin_claims_lock:
            _stdin_claims.discard(self._in_fd)


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


class SocketBackend(_Reader):
    """A UNIX socket at ``path``: one client at a time gets the guest's output
    (dropped while none is connected) and types to the guest."""

    def __init__(self, ctx: DeviceContext, sink: InputSink, path: Path):
        self._listener, self._inode = listen_unix_socket(path, ctx.name)
        self._acceptor = Acceptor(self._listener, f"{ctx.name} socket {path}")
        super().__init__(ctx, sink)
        self.path = path
        self._lock = threading.Lock()            # guards _client and _out
        self._client: socket.socket | None = None
        self._out = bytearray()
        self.dropped = 0                         # output bytes no client could take

    @property
    def connected(self) -> bool:
        with self._lock:
            return self._client is not None

    def write(self, data: bytes) -> None:
        with self._lock:
            client = self._client
            if client is None:
                self.dropped += len(data)
                return
            if not self._out:                    # fast path: straight to the client
                try:
                    n = client.send(data)
                except (BlockingIOError, InterruptedError):
                    n = 0
                except OSError:                  # the reader notices the hang-up
                    self.dropped += len(data)
                    return
                data = data[n:]
                if not data:
                    return
            room = SOCKET_OUT_LIMIT - len(self._out)
            if len(data) > room:
                self.dropped += len(data) - room
                data = data[:room]
            self._out += data
        self._wake()                             # the thread flushes the rest

    def start(self) -> None:
        self._spawn("socket", self._run)

    def _run(self) -> None:
        while not self._done():
            with self._lock:
                client = self._client
                want_write = client is not None and bool(self._out)
            room = self._sink.room() if client is not None else 0
            rlist: list = [self._wake_r]
            if self._acceptor.wanted():
                rlist.append(self._listener)
            if client is not None and room > 0:
                rlist.append(client)
            try:
                readable, writable, _ = select.select(rlist, [client] if want_write else [],
                                                      [], self._acceptor.timeout(POLL_S))
            except (OSError, ValueError):
                return
            if self._wake_r in readable:
                self._drain_wake()
            if self._done():
                return
            if self._listener in readable:
                self._accept()
            if client is not None and client in writable:
                self._flush(client)
            if client is not None and client in readable:
                self._receive(client, room)

    def _accept(self) -> None:
        conn = self._acceptor.accept()
        if conn is None:
            return
        conn.setblocking(False)
        with self._lock:
            if self._client is None:
                self._client = conn
                return
        try:
            conn.send(f"kvmkit: {self._ctx.name} already has a client\r\n".encode())
        except OSError:
            pass
        conn.close()

    def _flush(self, client: socket.socket) -> None:
        with self._lock:
            if self._client is not client or not self._out:
                return
            try:
                n = client.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(self._out)
                self.dropped += n
            del self._out[:n]

    def _receive(self, client: socket.socket, room: int) -> None:
        try:
            data = client.recv(min(room, CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._hang_up(client)
            return
        self._sink.feed(data)

    def _hang_up(self, client: socket.socket) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
                self._out.clear()
        client.close()

    def _release(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self._listener.close()
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


