"""Host ends of console ports: file descriptors (stdio, stdout, stderr,
stdin, an append-only file), a UNIX socket, a file fed to the guest.

Guest output reaches a backend through ``write(data)`` on the device's
queue worker, which never waits: a writer thread empties a bounded buffer
into the fd, and while the buffer is full the device leaves the guest's
output in its transmit ring (``room()`` is 0) until the writer calls
``link.output_room()``.  Input is read by a reader thread only while the
device has room for it (``link.room()``); end-of-file hangs the port up, so
the guest reads end-of-file too.  ``close()`` delivers what is buffered,
giving up once the fd makes no progress for ``FLUSH_STALL_S``.
"""
from __future__ import annotations

import atexit
import os
import select
import socket
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Protocol

from kvmkit.plugin_api import Acceptor, DeviceContext, DeviceError, listen_unix_socket

POLL_S = 0.2
CHUNK = 64 * 1024
OUT_LIMIT = 256 * 1024          # guest output buffered per port before the guest waits
FLUSH_STALL_S = 10.0            # at close: give up on an fd that takes nothing for this long
ESCAPE = 0x01                   # Ctrl-A, then x: quit (stdio console on a terminal)


class PortLink(Protocol):
    """The device end of a port, as its backend sees it."""

    def room(self) -> int: ...

    def feed(self, data: bytes) -> None: ...

    def connected(self, flag: bool) -> None: ...

    def output_room(self) -> None: ...


class _Writer:
    """Guest output into ``fd`` through a bounded buffer and a thread."""

    def __init__(self, ctx: DeviceContext, link: PortLink, fd: int, label: str,
                 limit: int | None = None):
        self._ctx, self._link, self._fd, self._label = ctx, link, fd, label
        self._limit = OUT_LIMIT if limit is None else limit
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._closing = False
        self.failed = False
        self.written = 0
        self._thread: threading.Thread | None = None

    def room(self) -> int:
        with self._cond:
            return 1 << 30 if self.failed else self._limit - len(self._buf)

    def write(self, data: bytes) -> None:
        with self._cond:
            if self.failed:
                return
            self._buf += data
            self._cond.notify()

    def start(self) -> None:
        self._thread = self._ctx.spawn(f"{self._label}-out", self._run)

    def _run(self) -> None:
        stalled_since = None
        while True:
            with self._cond:
                while not self._buf and not self._closing:
                    self._cond.wait(POLL_S)
                if not self._buf:
                    return                                   # closing and flushed
                chunk = bytes(self._buf[:CHUNK])
            try:
                ready = select.select([], [self._fd], [], POLL_S)[1]
                n = os.write(self._fd, chunk) if ready else 0
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._fail(e)
                return
            now = time.monotonic()
            if n == 0:
                with self._cond:
                    closing = self._closing
                stalled_since = stalled_since or now
                if closing and now - stalled_since > FLUSH_STALL_S:
                    self._fail(TimeoutError(f"took nothing for {FLUSH_STALL_S:.0f} s"))
                    return
                continue
            stalled_since = None
            with self._cond:
                was_full = len(self._buf) >= self._limit
                del self._buf[:n]
                self.written += n
                now_room = len(self._buf) < self._limit
            if was_full and now_room:
                self._link.output_room()

    def _fail(self, e: BaseException) -> None:
        with self._cond:
            self.failed = True
            lost = len(self._buf)
            self._buf.clear()
        self._ctx.log.warning("%s: writing guest output failed (%s); %d bytes dropped, "
                              "and further output is discarded", self._label, e, lost)
        self._link.output_room()                             # the guest must not wait on us

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(FLUSH_STALL_S + 5)


class _Reader:
    """Host input from ``fd`` while the device has room; EOF hangs the port up."""

    def __init__(self, ctx: DeviceContext, link: PortLink, fd: int, label: str,
                 escape: bool = False):
        self._ctx, self._link, self._fd, self._label = ctx, link, fd, label
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._closed = False
        self._escape = escape
        self._after_escape = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = self._ctx.spawn(f"{self._label}-in", self._run)

    def notify_room(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _run(self) -> None:
        while not self._closed and not self._ctx.stopping.is_set():
            room = self._link.room()
            fds = [self._wake_r, self._fd] if room > 0 or self._escape else [self._wake_r]
            try:
                ready = select.select(fds, [], [], POLL_S)[0]
            except (OSError, ValueError):
                return
            if self._wake_r in ready:
                try:
                    os.read(self._wake_r, 512)
                except OSError:
                    pass
            if self._fd not in ready or self._closed:
                continue
            try:
                data = os.read(self._fd, max(min(room, CHUNK), 1))
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self._link.connected(False)                  # the guest reads EOF
                return
            if self._escape:
                data = self._filter(data)
            if data:
                self._link.feed(data)

    def _filter(self, data: bytes) -> bytes:
        out = bytearray()
        for b in data:
            if self._after_escape:
                self._after_escape = False
                if b in (ord("x"), ord("X")):
                    self._ctx.request_stop("user quit (Ctrl-A x)", 0)
                    return bytes(out)
                out.append(b)                                # Ctrl-A Ctrl-A: one Ctrl-A
            elif b == ESCAPE:
                self._after_escape = True
            else:
                out.append(b)
        return bytes(out)

    def close(self) -> None:
        self._closed = True
        self.notify_room()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)


class FdBackend:
    """Output to ``out_fd`` and/or input from ``in_fd`` (-1: none).  A terminal
    on input with ``raw`` is put in raw mode (restored on close or at exit),
    and Ctrl-A x quits."""

    def __init__(self, ctx: DeviceContext, link: PortLink, label: str, *, out_fd: int = -1,
                 in_fd: int = -1, raw: bool = False, owns_out: bool = False):
        self._owns_out = owns_out
        self.out_fd = out_fd
        self.writer = _Writer(ctx, link, out_fd, label) if out_fd >= 0 else None
        self._raw = raw and in_fd >= 0 and _isatty(in_fd)
        self.reader = _Reader(ctx, link, in_fd, label, escape=self._raw) if in_fd >= 0 else None
        self._in_fd = in_fd
        self._saved_tty = None

    @property
    def connected_at_start(self) -> bool:
        return True

    def room(self) -> int:
        return self.writer.room() if self.writer else 1 << 30

    def write(self, data: bytes) -> None:
        if self.writer:
            self.writer.write(data)

    def notify_room(self) -> None:
        if self.reader:
            self.reader.notify_room()

    def start(self) -> None:
        if self._raw:
            try:
                self._saved_tty = termios.tcgetattr(self._in_fd)
                tty.setraw(self._in_fd, termios.TCSANOW)
            except termios.error:
                self._saved_tty = None
            else:
                atexit.register(self._restore)
        for part in (self.writer, self.reader):
            if part:
                part.start()

    def _restore(self) -> None:
        saved, self._saved_tty = self._saved_tty, None
        if saved is not None:
            try:
                termios.tcsetattr(self._in_fd, termios.TCSADRAIN, saved)
            except termios.error:
                pass

    def close(self) -> None:
        if self.reader:
            self.reader.close()
        if self.writer:
            self.writer.close()
        self._restore()
        atexit.unregister(self._restore)
        if self._owns_out and self.out_fd >= 0:
            os.close(self.out_fd)
            self.out_fd = -1


def open_log(ctx: DeviceContext, path: Path, label: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise DeviceError(f"{label}: cannot open {path} for guest output: {e.strerror}") from None


class FeedBackend:
    """The guest reads ``path``'s content from the port, then end-of-file;
    its output on the port is discarded.  The file is read when the VM is
    built (an unreadable file is an error then)."""

    def __init__(self, ctx: DeviceContext, link: PortLink, label: str, path: Path):
        try:
            self._data = Path(path).read_bytes()
        except OSError as e:
            raise DeviceError(f"{label}: cannot read {path}: {e.strerror}") from None
        self._link = link
        self.connected_at_start = True

    def room(self) -> int:
        return 1 << 30

    def write(self, data: bytes) -> None:
        """Discarded."""

    def notify_room(self) -> None:
        self._push()

    def start(self) -> None:
        self._push()

    def _push(self) -> None:
        if self._data is None:
            return
        n = min(self._link.room(), len(self._data))
        if n:
            self._link.feed(self._data[:n])
            self._data = self._data[n:]
        if not self._data:
            self._data = None
            self._link.connected(False)

    def close(self) -> None:
        self._data = None


class SocketBackend:
    """A UNIX socket at ``path`` (owner-only): one client at a time reads the
    port's output and writes its input.  The guest sees the port open while
    a client is connected (its writes wait meanwhile); console output with
    no client is dropped."""

    def __init__(self, ctx: DeviceContext, link: PortLink, label: str, path: Path,
                 console: bool = False):
        self._ctx, self._link, self._label, self.path = ctx, link, label, Path(path)
        self._console = console
        self._listener, self._inode = listen_unix_socket(self.path, label)
        self._acceptor = Acceptor(self._listener, f"{label} socket {self.path}")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._out = bytearray()
        self._closed = False
        self.dropped = 0
        self._thread = None
        self.connected_at_start = False

    def room(self) -> int:
        with self._lock:
            if self._client is None:
                return 1 << 30 if self._console else 0
            return OUT_LIMIT - len(self._out)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._client is None:
                self.dropped += len(data)
                return
            self._out += data
        self._wake()

    def notify_room(self) -> None:
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def start(self) -> None:
        self._thread = self._ctx.spawn(f"{self._label}-socket", self._run)

    def _run(self) -> None:
        while not self._closed and not self._ctx.stopping.is_set():
            with self._lock:
                client, want_write = self._client, bool(self._out)
            rlist = [self._wake_r]
            if self._acceptor.wanted():
                rlist.append(self._listener)
            if client is not None and self._link.room() > 0:
                rlist.append(client)
            try:
                r, w, _ = select.select(rlist, [client] if client and want_write else [], [],
                                        self._acceptor.timeout(POLL_S))
            except (OSError, ValueError):
                return
            if self._wake_r in r:
                try:
                    os.read(self._wake_r, 512)
                except OSError:
                    pass
            if self._listener in r:
                self._accept()
            if client is not None and client in w:
                self._flush(client)
            if client is not None and client in r:
                try:
                    data = client.recv(min(self._link.room(), CHUNK) or 1)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    self._link.feed(data)
                else:
                    self._hang_up(client)

    def _accept(self) -> None:
        conn = self._acceptor.accept()
        if conn is None:
            return
        conn.setblocking(False)
        with self._lock:
            if self._client is not None:
                conn.close()
                return
            self._client = conn
        self._link.connected(True)

    def _flush(self, client) -> None:
        with self._lock:
            try:
                n = client.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                n = len(self._out)
                self.dropped += n
            was_full = len(self._out) >= OUT_LIMIT
            del self._out[:n]
        if was_full:
            self._link.output_room()

    def _hang_up(self, client) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
                self._out.clear()
        client.close()
        self._link.connected(False)
        self._link.output_room()

    def close(self) -> None:
        self._closed = True
        self._wake()
        if self._thread is not None:
            self._thread.join(2.0)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        try:
            if os.lstat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except OSError:
            pass


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


