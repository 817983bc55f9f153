"""A UNIX stream socket a device listens on for its host-side client (the
serial and virtio-console ``socket`` backends), and :class:`Acceptor`, which
takes connections on any listener without dying or spinning when the process
is out of descriptors; both exported by kvmkit.plugin_api."""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import time
from pathlib import Path

from .guest_log import GuestLog
from .plugin_api import DeviceError

ACCEPT_RETRY_S = 0.1        # how long a listener rests after accept() failed
# accept() errors that say the listener itself is gone: nothing to retry.
LISTENER_GONE = {errno.EBADF, errno.ENOTSOCK, errno.EINVAL}

_log = GuestLog(logging.getLogger("kvmkit.host_socket"))


class Acceptor:
    """``accept()`` on ``listener`` for a loop that polls it.

    When the process is out of descriptors (EMFILE, ENFILE) or memory,
    accept() fails while the pending connection keeps the listener readable:
    a loop that returns, or raises, loses its listener for good, and one that
    polls again at once spins a core until descriptors come back.  This one
    logs (rate-limited), rests the listener for ``retry_s`` (:meth:`wanted` is
    False, :meth:`timeout` says how long) and retries; the pending client is
    served once descriptors are free.  ``failures`` counts the failed accepts.

        acceptor = Acceptor(listener, "ttyS0 socket")
        rlist = [other] + ([listener] if acceptor.wanted() else [])
        ready = select.select(rlist, [], [], acceptor.timeout(POLL_S))[0]
        if listener in ready and (conn := acceptor.accept()) is not None: ...
    """

    def __init__(self, listener: socket.socket, what: str, retry_s: float = ACCEPT_RETRY_S,
                 clock=time.monotonic):
        self.listener = listener
        self.what = what
        self.retry_s = retry_s
        self.failures = 0
        self.gone = False                 # the listener was closed under us
        self._clock = clock
        self._rest_until = 0.0
        self._resting = False             # what wanted() last said, for timeout()

    def wanted(self) -> bool:
        """Whether to poll the listener now (False while it rests or is gone)."""
        self._resting = not self.gone and self._clock() < self._rest_until
        return not self.gone and not self._resting

    def timeout(self, default: float | None = None) -> float | None:
        """A select() timeout no longer than ``default``: while the last
        :meth:`wanted` left the listener out, the time until its rest ends."""
        if not self._resting:
            return default
        rest = max(0.0, self._rest_until - self._clock())
        return rest if default is None else min(rest, default)

    def accept(self) -> socket.socket | None:
        """A new connection, or None (nobody waiting, or accept failed: see above)."""
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            if e.errno in LISTENER_GONE:
                self.gone = True
                return None
            self.failures += 1
            self._rest_until = self._clock() + self.retry_s
            _log.warning(("accept", self.what), "%s: cannot accept a connection (%s); "
                         "retrying every %g s", self.what, e.strerror or e, self.retry_s)
            return None
        return conn


def listen_unix_socket(path: Path, name: str) -> tuple[socket.socket, int]:
    """Listen at ``path`` (owner-only, non-blocking, backlog 1), replacing a
    stale socket file; a path another process listens on, or that is not a
    socket, is a DeviceError naming ``name``.  Returns the socket and the
    inode of its file (so that closing removes only our own file)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise DeviceError(f"{name}: cannot use {path}: {e.strerror}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise DeviceError(f"{name}: {path} exists and is not a socket; "
                              "remove it or choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:           # nobody listens: a leftover, replace it
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise DeviceError(f"{name}: cannot check whether {path} is in use: "
                              f"{e.strerror or e}") from None
        else:
            raise DeviceError(f"{name}: {path} is in use by a running listener "
                              "(another kvmkit?); choose another path")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)                    # before listen(): nobody else can connect
        sock.listen(1)
        sock.setblocking(False)
        inode = os.lstat(path).st_ino
    except OSError as e:
        sock.close()
        raise DeviceError(f"{name}: cannot listen on {path}: {e.strerror or e}") from None
    return sock, inode
