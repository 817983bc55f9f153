"""The control socket's server, without KVM: a fake machine behind a real
ControlServer on a real UNIX socket.  Every malformed request gets one JSON
error answer on the same connection, which keeps serving."""
from __future__ import annotations

import json
import select
import socket
import threading
import time

import pytest

from kvmkit import control
from kvmkit.control import ControlServer

DEADLINE_S = 5.0
# A connection thread that dies is a failure, not a warning.
pytestmark = pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")


class FakeMachine:
    """What the server calls on a machine, recorded."""

    def __init__(self):
        self.stopping = threading.Event()
        self.calls: list = []
        self.paused = False

    def status(self):
        return {"name": "fake", "state": "paused" if self.paused else "running"}

    def pause(self):
        self.calls.append("pause")
        self.paused = True

    def resume(self):
        self.calls.append("resume")
        self.paused = False

    def request_stop(self, reason, code):
        self.calls.append(("stop", reason, code))
        self.stopping.set()

    def request_guest_shutdown(self):
        self.calls.append("shutdown")
        return True


@pytest.fixture
def server(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    machine = FakeMachine()
    srv = ControlServer(machine, "vm")
    yield srv
    srv.stopped("test over", 0)
    srv.close()


class Client:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(DEADLINE_S)
        self.sock.connect(str(path))
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def answer(self) -> dict:
        """The next answer line; fails (never hangs) if none comes in time or the
        server closed the connection."""
        deadline = time.monotonic() + DEADLINE_S
        while b"\n" not in self.buf:
            assert time.monotonic() < deadline, "no answer in time"
            chunk = self.sock.recv(4096)
            assert chunk, f"the server closed the connection (got {self.buf!r})"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def ask(self, raw: bytes) -> dict:
        self.send_raw(raw + b"\n")
        return self.answer()

    def close(self):
        self.sock.close()


MALFORMED = [
    b"not json",
    b"{",
    b"\xff\xfe",
    b"[]",
    b"42",
    b"null",
    b'"status"',
    b"{}",
    b'{"cmd": 1}',
    b'{"cmd": null}',
    b'{"cmd": ["status"]}',
    b'{"cmd": "reboot"}',
    b'{"cmd": "stop", "timeout": null}',
    b'{"cmd": "stop", "timeout": [1]}',
    b'{"cmd": "stop", "timeout": "5"}',
    b'{"cmd": "stop", "timeout": true}',
    b'{"cmd": "stop", "timeout": {}}',
    b'{"cmd": "stop", "timeout": NaN}',
    b'{"cmd": "stop", "timeout": Infinity}',
    b'{"cmd": "stop", "timeout": -Infinity}',
    b'{"cmd": "stop", "timeout": -1}',
    b'{"cmd": "stop", "timeout": 1e400}',
    b'{"cmd": "stop", "timeout": 1e300}',
    b'{"cmd": "status", "bogus": 1}',
]


@pytest.mark.parametrize("raw", MALFORMED, ids=[r.decode("latin-1") for r in MALFORMED])
def test_malformed_request_gets_an_error_and_the_connection_serves_on(server, raw):
    c = Client(server.path)
    try:
        bad = c.ask(raw)
        assert bad["ok"] is False and isinstance(bad["error"], str) and bad["error"], bad
        assert "\n" not in bad["error"]
        good = c.ask(b'{"cmd": "status"}')          # the same connection still answers
        assert good == {"ok": True, "result": {"name": "fake", "state": "running"}}
    finally:
        c.close()
    assert not server.machine.stopping.is_set(), server.machine.calls   # nothing was forced


def test_stop_with_a_valid_timeout_is_graceful_and_forces_after_it(server):
    c = Client(server.path)
    try:
        ok = c.ask(b'{"cmd": "stop", "timeout": 0.2}')
    finally:
        c.close()
    assert ok == {"ok": True, "result": {"graceful": True, "timeout": 0.2}}
    assert server.machine.stopping.wait(DEADLINE_S)
    assert server.machine.calls[-1][0] == "stop" and "within 0.2 s" in server.machine.calls[-1][1]


def test_stop_default_timeout(server):
    c = Client(server.path)
    try:
        ok = c.ask(b'{"cmd": "stop"}')
    finally:
        c.close()
    assert ok["result"] == {"graceful": True, "timeout": control.DEFAULT_STOP_TIMEOUT}
    assert not server.machine.stopping.is_set()


def test_an_overlong_line_is_refused_without_buffering_it(server):
    c = Client(server.path)
    try:
        c.send_raw(b"x" * (control.MAX_REQUEST + 10) + b"\n")
        bad = c.answer()
        assert bad["ok"] is False and "too long" in bad["error"]
    finally:
        c.close()


def test_a_client_that_leaves_mid_line_does_not_kill_the_server(server):
    c = Client(server.path)
    c.send_raw(b'{"cmd": "sta')
    c.close()
    c = Client(server.path)
    try:
        assert c.ask(b'{"cmd": "pause"}')["result"]["state"] == "paused"
    finally:
        c.close()


def test_a_failing_machine_call_is_an_error_answer(server, monkeypatch):
    def broken():
        raise RuntimeError("the machine broke")
    monkeypatch.setattr(server.machine, "status", broken)
    c = Client(server.path)
    try:
        bad = c.ask(b'{"cmd": "status"}')
        assert bad["ok"] is False and "the machine broke" in bad["error"]
    finally:
        c.close()


def test_wait_answers_when_the_vm_stops(server):
    c = Client(server.path)
    try:
        c.send_raw(b'{"cmd": "wait"}\n')
        time.sleep(0.1)
        server.stopped("guest reset", 0)
        assert c.answer() == {"ok": True, "result": {"reason": "guest reset", "exit_code": 0}}
    finally:
        c.close()


# -- clients that hold on, leak, or never read: the socket stays usable ---------------
STATUS = b'{"cmd": "status"}'
CLEANUP_S = 60.0        # for threads to see EOF and end: seconds under load, but bounded
RUNNING = {"ok": True, "result": {"name": "fake", "state": "running"}}


def wait_until(predicate, deadline_s: float = DEADLINE_S) -> bool:
    end = time.monotonic() + deadline_s
    while not predicate():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


def conn_threads() -> int:
    return sum(t.name == "control-conn" for t in threading.enumerate())


def test_running_out_of_descriptors_does_not_end_the_control_socket(server):
    """Before: the accept thread returned on EMFILE, and the VM answered no
    request again (`kvmkit stop` timed out) even once descriptors were back."""
    from kvmkit.testing import descriptors_exhausted
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3)]
    try:
        with descriptors_exhausted():
            for s in clients:
                s.connect(str(server.path))        # queued: accept() fails meanwhile
            time.sleep(0.5)
        assert server.thread.is_alive()
        for s in clients:
            s.settimeout(DEADLINE_S)
            s.sendall(STATUS + b"\n")
            assert json.loads(s.makefile("rb").readline()) == RUNNING
        c = Client(server.path)                    # and a new client too
        assert c.ask(STATUS) == RUNNING
        c.close()
    finally:
        for s in clients:
            s.close()


def test_connections_are_bounded_and_the_newest_is_always_served(server):
    """Before: each connection got a thread for as long as it stayed open, so a
    script leaking connections grew the VMM without bound."""
    n = control.MAX_CONNECTIONS + 20
    base = conn_threads()
    clients = []
    try:
        for i in range(n):
            clients.append(Client(server.path))
            assert clients[-1].ask(STATUS) == RUNNING, f"connection {i} was not served"
        assert server.connections() == control.MAX_CONNECTIONS
        assert wait_until(lambda: conn_threads() - base <= control.MAX_CONNECTIONS, CLEANUP_S)
        assert server.evicted == 20
        # Closed for room, with a word: the idle longest (an old connection whose
        # thread was slow to mark itself idle may be passed over for a newer one).
        # Their lines and EOF were sent before the next client was served.
        closed = [c for c in clients if select.select([c.sock], [], [], 0)[0]]
        assert len(closed) == 20
        for old in closed:
            word = old.answer()
            assert word["ok"] is False and "idle longest" in word["error"]
            assert old.sock.recv(100) == b""
        for c in clients:                          # the rest still serve
            if c not in closed:
                assert c.ask(STATUS) == RUNNING
    finally:
        for c in clients:
            c.close()
    # Threads of earlier tests may still have been ending when `base` was taken: <=.
    assert wait_until(lambda: server.connections() == 0 and conn_threads() <= base, CLEANUP_S)


def test_when_every_connection_is_in_a_request_a_new_one_is_refused(server, monkeypatch):
    monkeypatch.setattr(control, "MAX_CONNECTIONS", 3)
    waiters = [Client(server.path) for _ in range(3)]
    try:
        for w in waiters:
            w.send_raw(b'{"cmd": "wait"}\n')
        assert wait_until(lambda: server._waiters == 3, CLEANUP_S)
        late = Client(server.path)
        refused = late.answer()
        assert refused["ok"] is False and "in a request" in refused["error"]
        assert late.sock.recv(100) == b""
        late.close()
        server.stopped("guest powered off", 0)     # the waits are still answered
        for w in waiters:
            assert w.answer() == {"ok": True, "result": {"reason": "guest powered off", "exit_code": 0}}
    finally:
        for w in waiters:
            w.close()


def test_a_client_that_never_reads_its_answers_is_dropped(server, monkeypatch):
    """Before: its thread blocked in sendall() for good once the socket's
    buffer was full of unread answers."""
    monkeypatch.setattr(control, "SEND_DEADLINE_S", 0.5)
    c = Client(server.path)
    c.sock.setblocking(False)
    sent, dropped = 0, False
    try:
        end = time.monotonic() + DEADLINE_S
        while time.monotonic() < end and not dropped:  # requests until the server lets go
            try:
                sent += c.sock.send(STATUS + b"\n")
            except BlockingIOError:
                select.select([], [c.sock], [], 0.1)
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
        assert dropped, f"still connected after {sent} bytes of requests"
        assert wait_until(lambda: server.connections() == 0, CLEANUP_S)
    finally:
        c.close()
    d = Client(server.path)
    assert d.ask(STATUS) == RUNNING
    d.close()
