"""The control socket of a running VM: JSON lines over a UNIX socket.

Each running VM listens on ``<runtime dir>/<name>.sock`` (owner-only).
A request is one JSON object per line, ``{"cmd": "status"}``; the answer is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": "..."}``.

    status                  state, vCPUs, memory, devices, uptime, exit counts
    pause / resume          every vCPU and every device thread
    stop [timeout]          ask the guest to shut down (Ctrl-Alt-Del, power
                            button); forced after ``timeout`` seconds (30)
    kill                    stop now
    wait                    answer once the VM has stopped: its reason and status
    snapshot path [resume]  pause and save the VM into directory ``path`` (absolute,
                            must not exist); it stays paused unless ``resume``

The runtime directory is ``$XDG_RUNTIME_DIR/kvmkit``, else
``/tmp/kvmkit-<uid>``, created with mode 0700.

A client cannot take the socket away from the next one: at most
``MAX_CONNECTIONS`` are served at once (when all are open, the one idle
longest is closed with an error line; when all are in a request, the new one
is refused with one), an answer the client does not read within
``SEND_DEADLINE_S`` drops it, and when the process is out of descriptors the
listener rests and retries instead of giving up.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
import struct
import threading
import time
from pathlib import Path

from .host_socket import Acceptor
from .plugin_api import EXIT_FORCED

log = logging.getLogger("kvmkit.control")

DEFAULT_STOP_TIMEOUT = 30.0
MAX_STOP_TIMEOUT = 86400.0          # a day; longer waits are a typo (and overflow timers)
MAX_REQUEST = 64 * 1024             # bytes in one request line
MAX_CONNECTIONS = 64                # served at once (a thread each); see ControlServer._admit
SEND_DEADLINE_S = 10.0              # a client that takes no answer for this long is dropped
LISTEN_BACKLOG = 64                 # connections the kernel queues before accept()
CONNECT_RETRY_S = 0.05              # a client's pause before connecting again to a full backlog
CLOSE_WAIT_S = 2.0                  # how long a stopping VM waits for its clients' answers
COMMAND_KEYS = {"status": (), "pause": (), "resume": (), "kill": (), "wait": (),
                "stop": ("timeout",), "snapshot": ("path", "resume")}


class ControlError(Exception):
    """The control socket cannot be used (the message says why)."""


class RequestError(ValueError):
    """A malformed request (answered with ``{"ok": false, "error": ...}``)."""


def check_stop_timeout(value) -> float:
    """The seconds a graceful stop waits: a finite number from 0 to a day."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"timeout must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not 0 <= seconds <= MAX_STOP_TIMEOUT:          # also NaN
        raise RequestError(f"timeout must be from 0 to {MAX_STOP_TIMEOUT:g} seconds, got {value!r}")
    return seconds


def parse_request(line: bytes) -> dict:
    """One request line -> a dict with a known "cmd" and only its keys."""
    try:
        req = json.loads(line)
    except (ValueError, RecursionError):
        raise RequestError('not a JSON request: send one JSON object per line, e.g. {"cmd": "status"}') from None
    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
        raise RequestError('a request is a JSON object with a string "cmd", e.g. {"cmd": "status"}')
    cmd = req["cmd"]
    if cmd not in COMMAND_KEYS:
        raise RequestError(f"unknown command {cmd[:40]!r} ({', '.join(COMMAND_KEYS)})")
    extra = sorted(k for k in req if k != "cmd" and k not in COMMAND_KEYS[cmd])
    if extra:
        raise RequestError(f"{cmd}: unknown key {extra[0][:40]!r}"
                           + (f" (it takes {', '.join(COMMAND_KEYS[cmd])})" if COMMAND_KEYS[cmd]
                              else " (it takes none)"))
    if "timeout" in req:
        req["timeout"] = check_stop_timeout(req["timeout"])
    if cmd == "snapshot":
        path = req.get("path")
        if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
            raise RequestError("snapshot: \"path\" must be an absolute path (a directory that "
                               "does not exist yet)")
        if not isinstance(req.get("resume", False), bool):
            raise RequestError("snapshot: \"resume\" must be true or false")
    return req


SUN_PATH_MAX = 107                  # bytes of a UNIX socket's path (sun_path less its NUL)
SOCKET_SUFFIXES = (".sock", ".console")


def runtime_dir_path() -> Path:
    """Where the sockets live (not created)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    return Path(base) / "kvmkit" if base else Path(f"/tmp/kvmkit-{os.getuid()}")


def check_socket_name(name: str) -> str | None:
    """Why a VM called ``name`` cannot have its sockets here, or None."""
    longest = runtime_dir_path() / f"{name}{max(SOCKET_SUFFIXES, key=len)}"
    size = len(os.fsencode(longest))
    if size > SUN_PATH_MAX:
        return (f"{name!r} makes the socket path {longest} {size} bytes long, over the "
                f"{SUN_PATH_MAX} a UNIX socket allows; give a name at most "
                f"{len(name) - (size - SUN_PATH_MAX)} characters long (or a shorter XDG_RUNTIME_DIR)")
    return None


def runtime_dir() -> Path:
    path = runtime_dir_path()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise ControlError(f"{path} is not a private directory of this user: remove it or "
                           "set XDG_RUNTIME_DIR")
    return path


def socket_path(name: str) -> Path:
    return runtime_dir() / f"{name}.sock"


def console_path(name: str) -> Path:
    return runtime_dir() / f"{name}.console"


def _alive(path: Path) -> bool:
    """Whether a VM listens at ``path``.  Only a refused connection (or no
    file) says no: a listener whose backlog is full (EAGAIN) is a busy VM,
    and taking it for a stale socket would unlink a live VM's controls."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(str(path))
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        return True
    finally:
        s.close()


def listen(path: Path, what: str) -> socket.socket:
    """A listening UNIX socket at ``path`` (owner-only); a stale one is replaced."""
    if path.exists() or path.is_symlink():
        if _alive(path):
            raise ControlError(f"a VM named {path.stem!r} is already running ({what} {path}); "
                               "give this one another name (--name) or stop that one")
        path.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise ControlError(f"cannot listen on {path} ({what}): {e.strerror or e}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    s.listen(LISTEN_BACKLOG)
    return s


def _connect(name: str, path: Path, wait_s: float | None) -> socket.socket:
    """A connection to VM ``name``'s control socket.  A refused connection is
    a stale socket (removed); a full backlog (EAGAIN: the VM is busy) is
    retried until ``wait_s`` has passed, and never taken for a stale one."""
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(wait_s)
        try:
            s.connect(str(path))
            return s
        except BlockingIOError:
            s.close()
            if deadline is not None and time.monotonic() >= deadline:
                raise ControlError(f"VM {name!r} is too busy to take a control connection "
                                   f"(none taken in {wait_s:g} s); try again") from None
            time.sleep(CONNECT_RETRY_S)
        except ConnectionRefusedError:
            s.close()
            path.unlink(missing_ok=True)
            raise ControlError(f"no VM named {name!r} is running (removed its stale socket)") from None
        except FileNotFoundError:
            s.close()
            raise ControlError(f"no VM named {name!r} is running (see kvmkit list)") from None
        except OSError as e:
            s.close()
            raise ControlError(f"cannot reach VM {name!r} at {path}: {e.strerror or e}") from None


def request(name: str, cmd: str, wait_s: float | None = 10, **args) -> dict:
    """Send one request to VM ``name`` and return its answer (``wait_s``:
    how long to wait for it; None waits as long as it takes).  Every way
    this fails is a ControlError."""
    return exchange(name, [(cmd, args, wait_s)])[0]


def exchange(name: str, requests: list[tuple[str, dict, float | None]],
             on_answer=None) -> list[dict]:
    """Send ``(cmd, args, wait_s)`` requests to VM ``name`` one after another
    on one connection, up to the first error answer; their answers.  Fewer
    answers than requests: the VM closed the connection (it stopped).  A VM
    that cannot be reached, that does not answer in time, or that answers
    not even the first request, is a ControlError.
    ``on_answer(answer)`` is called with each answer as it comes.
    `kvmkit kill` sends "kill" then "wait" this way: the VM owes an answer
    to a connection that asked it to stop, so the "wait" is never lost to
    the VM closing its socket in between."""
    path = socket_path(name)
    if not path.exists():
        raise ControlError(f"no VM named {name!r} is running (see kvmkit list)")
    s = _connect(name, path, requests[0][2])
    answers: list[dict] = []
    try:
        with s, s.makefile("rwb") as f:
            for cmd, args, wait_s in requests:
                s.settimeout(wait_s)
                f.write(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
                f.flush()
                line = f.readline()
                if not line:
                    break
                answers.append(json.loads(line))
                if on_answer is not None:
                    on_answer(answers[-1])
                if not answers[-1].get("ok"):
                    break
    except TimeoutError:
        raise ControlError(f"VM {name!r} did not answer {cmd!r} within {wait_s:g} s") from None
    except OSError:                       # reset or broken pipe: it went away mid-request
        pass
    if not answers:
        raise ControlError(f"VM {name!r} closed the control connection without answering "
                           "(it is stopping, or stopped)")
    return answers


def _send_now(conn: socket.socket, answer: dict) -> None:
    """Send one answer line if the socket takes it now (never waits: the
    client may not be reading)."""
    try:
        conn.send(json.dumps(answer).encode() + b"\n", socket.MSG_DONTWAIT)
    except OSError:
        pass


def running_vms() -> list[str]:
    """Names of the VMs with a live control socket; stale sockets are removed."""
    names = []
    for path in sorted(runtime_dir().glob("*.sock")):
        if _alive(path):
            names.append(path.stem)
        else:
            path.unlink(missing_ok=True)
            console_path(path.stem).unlink(missing_ok=True)
    return names


class ControlServer:
    def __init__(self, machine, name: str):
        self.machine = machine
        self.path = socket_path(name)
        self.sock = listen(self.path, "control socket")
        self._closed = threading.Event()
        self._stopped = threading.Event()
        self.final: dict | None = None
        self._waiters = 0
        self._waiters_lock = threading.Condition()
        # Each connection served -> since when it is idle (None: in a request).
        self._conns: dict[socket.socket, float | None] = {}
        # Connections owed an answer before the VM goes (close() waits for them):
        # admitted and not answered yet, or asked kill/stop and not answered "wait".
        self._owed: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.evicted = 0                        # idle connections closed to make room
        self._closing = False                   # close() has begun (it runs once)
        self.thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self.thread.start()

    # -- serving -----------------------------------------------------------------------
    def _accept(self) -> None:
        """Take connections until close(): a failed accept (out of descriptors)
        rests and retries, and at most ``MAX_CONNECTIONS`` are served at once."""
        acceptor = Acceptor(self.sock, f"control socket {self.path}")
        while not self._closed.is_set():
            conn = acceptor.accept()
            if conn is None:
                if acceptor.gone:
                    return
                self._closed.wait(acceptor.retry_s)    # it failed: rest, then retry
                continue
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Serve ``conn`` on a thread of its own, making room if all are taken:
        the connection idle longest is closed (with an error line), and if every
        one is in a request (a "wait"), ``conn`` is refused."""
        with self._conns_lock:
            if len(self._conns) >= MAX_CONNECTIONS:
                idle = {c: since for c, since in self._conns.items() if since is not None}
                if not idle:
                    _send_now(conn, {"ok": False, "error": f"refused: all {MAX_CONNECTIONS} control "
                                     "connections are in a request; close one or try again later"})
                    conn.close()
                    return
                oldest = min(idle, key=idle.__getitem__)
                _send_now(oldest, {"ok": False, "error": f"closed: {MAX_CONNECTIONS} control "
                                   "connections were open and this one was idle longest"})
                try:
                    oldest.shutdown(socket.SHUT_RDWR)   # its thread sees EOF and ends
                except OSError:
                    pass
                del self._conns[oldest]                 # its thread will not count against the cap
                self.evicted += 1
            self._conns[conn] = time.monotonic()
        self._owe(conn)
        # A client that sends requests but never reads the answers would hold
        # its thread in sendall() for good, busy and so never closed for room.
        seconds = int(SEND_DEADLINE_S)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        struct.pack("ll", seconds, int((SEND_DEADLINE_S - seconds) * 1e6)))
        try:
            threading.Thread(target=self._serve, args=(conn,), name="control-conn", daemon=True).start()
        except RuntimeError:                            # no thread to be had: say so, serve on
            self._forget(conn)
            _send_now(conn, {"ok": False, "error": "refused: the VMM cannot start a thread for "
                             "this connection"})
            conn.close()

    def _forget(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.pop(conn, None)
        self._settle(conn)

    def _owe(self, conn: socket.socket) -> None:
        with self._waiters_lock:
            self._owed.add(conn)

    def _settle(self, conn: socket.socket) -> None:
        with self._waiters_lock:
            if conn in self._owed:
                self._owed.discard(conn)
                self._waiters_lock.notify_all()

    def _set_busy(self, conn: socket.socket, busy: bool) -> None:
        with self._conns_lock:
            if conn in self._conns:             # not if it was closed to make room
                self._conns[conn] = None if busy else time.monotonic()

    def connections(self) -> int:
        """Connections being served now."""
        with self._conns_lock:
            return len(self._conns)

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_lines(conn)
        finally:
            self._forget(conn)

    def _serve_lines(self, conn: socket.socket) -> None:
        """Answer each request line; a malformed one gets an error answer and the
        connection serves on.  It ends at EOF, at an over-long line, when an
        answer waits ``SEND_DEADLINE_S`` for the client to read, or when
        :meth:`_admit` closes it to make room."""
        # A reader of its own: BufferedRWPair.readline ignores its limit.
        with conn, conn.makefile("rb") as reader:
            while True:
                try:
                    line = reader.readline(MAX_REQUEST + 1)
                except OSError:
                    return
                if not line:
                    return
                if len(line) > MAX_REQUEST and not line.endswith(b"\n"):
                    self._reply(conn, {"ok": False, "error": f"request too long (over {MAX_REQUEST} bytes)"})
                    return                      # the rest of the line cannot be told from a request
                if not line.strip():
                    continue
                self._set_busy(conn, True)
                answer, waiting, stopping = self._answer(line, conn)
                sent = self._reply(conn, answer)
                self._set_busy(conn, False)
                if not stopping:                # after kill/stop, the "wait" that may follow
                    self._settle(conn)
                if waiting:                     # close() waits for this answer to go out
                    with self._waiters_lock:
                        self._waiters -= 1
                        self._waiters_lock.notify_all()
                if not sent:
                    return

    @staticmethod
    def _reply(conn: socket.socket, answer: dict) -> bool:
        try:
            conn.sendall(json.dumps(answer).encode() + b"\n")
            return True
        except OSError:
            return False

    def _answer(self, line: bytes, conn: socket.socket) -> tuple[dict, bool, bool]:
        """The answer to one line, whether it was a counted "wait", and whether
        it stopped the VM (kill/stop: ``conn`` stays owed its "wait" answer)."""
        try:
            req = parse_request(line)
        except RequestError as e:
            return {"ok": False, "error": str(e)}, False, False
        waiting = req["cmd"] == "wait"
        stopping = req["cmd"] in ("kill", "stop")
        if waiting:
            with self._waiters_lock:
                self._waiters += 1
        if stopping:                            # before the VM can begin to stop
            self._owe(conn)
        try:
            return {"ok": True, "result": self.handle(req)}, waiting, stopping
        except (RequestError, ControlError) as e:
            return {"ok": False, "error": str(e)}, waiting, False
        except Exception as e:                  # a machine call failed: answer, log, serve on
            log.exception("control request %r failed", req["cmd"])
            return ({"ok": False, "error": f"{req['cmd']} failed: {type(e).__name__}: {e}"},
                    waiting, False)

    def handle(self, req: dict):
        """Carry out a request checked by :func:`parse_request`."""
        m = self.machine
        cmd = req["cmd"]
        if cmd == "status":
            return m.status()
        if cmd in ("pause", "resume"):
            from .machine import PauseError
            try:
                if cmd == "pause":
                    m.pause()
                else:
                    m.resume()
            except PauseError as e:                # something hung: say what, the VM runs
                raise ControlError(str(e)) from None
            return m.status()
        if cmd == "kill":
            m.request_stop("killed through the control socket", EXIT_FORCED)
            return {"stopping": True}
        if cmd == "stop":
            return self._graceful_stop(check_stop_timeout(req.get("timeout", DEFAULT_STOP_TIMEOUT)))
        if cmd == "wait":
            self._stopped.wait()
            return self.final
        if cmd == "snapshot":
            from .machine import PauseError
            from .snapshot import take
            from .snapshot_format import SnapshotError
            try:
                return take(m, req["path"], resume=req.get("resume", False))
            except (PauseError, SnapshotError) as e:
                raise ControlError(f"snapshot failed: {e}") from None
        raise RequestError(f"unknown command {cmd!r} ({', '.join(COMMAND_KEYS)})")

    def _graceful_stop(self, timeout: float) -> dict:
        m = self.machine
        from .machine import PauseError
        try:
            m.resume()
        except PauseError as e:                    # the vCPUs run; the stop goes on
            log.warning("%s", e)
        if not m.request_guest_shutdown():
            m.request_stop("forced stop: no device can ask the guest to shut down", EXIT_FORCED)
            return {"graceful": False}

        def force_later():
            if not m.stopping.wait(timeout):
                m.request_stop(f"forced stop: the guest did not shut down within {timeout:g} s",
                               EXIT_FORCED)

        threading.Thread(target=force_later, name="stop-timeout", daemon=True).start()
        return {"graceful": True, "timeout": timeout}

    # -- lifecycle -----------------------------------------------------------------------
    def stopped(self, reason: str, code: int) -> None:
        """The VM has stopped: answer the waiters."""
        self.final = {"reason": reason, "exit_code": code}
        self._stopped.set()

    def close(self) -> None:
        """Stop serving.  No new client can connect from the first step on, and
        the clients already connected or queued in the listener's backlog get
        their answers first, as does the "wait" that `kvmkit kill`/`stop` send
        after their request on the same connection: for up to ``CLOSE_WAIT_S``.
        Closing again, also from another thread at the same time, does nothing."""
        with self._conns_lock:
            if self._closing:
                return
            self._closing = True
        self.path.unlink(missing_ok=True)
        self._drain_backlog()
        with self._waiters_lock:
            self._waiters_lock.wait_for(lambda: self._waiters <= 0 and not self._owed,
                                        timeout=CLOSE_WAIT_S)
        self._closed.set()
        self.sock.close()

    def _drain_backlog(self) -> None:
        """Admit every connection queued on the listener now (the accept thread,
        blocked in accept(), may take some of them too: it admits them as well)."""
        self.sock.setblocking(False)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:                     # none left (EAGAIN), or none can be had
                return
            conn.setblocking(True)
            self._admit(conn)
