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


# -- the client's side, and a VM that stops while clients are on their way ------------
def busy_listener(path):
    """A listener that never accepts, its backlog full: a VM too busy to accept."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(0)
    queued = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:
            s.close()
            return lst, queued
        queued.append(s)


def test_a_vm_too_busy_to_accept_is_not_taken_for_a_stale_socket(tmp_path, monkeypatch):
    """Before: connect() to a full backlog fails with EAGAIN at once, and both
    `request` (every kvmkit command) and `kvmkit list` took that for a stale
    socket and unlinked a live VM's control socket: it could never be stopped
    through it again."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = control.socket_path("busy")
    lst, queued = busy_listener(path)
    try:
        with pytest.raises(control.ControlError, match="too busy"):
            control.request("busy", "status", wait_s=0.5)
        assert path.exists()
        assert control.running_vms() == ["busy"]
        assert path.exists()
    finally:
        for s in queued:
            s.close()
        lst.close()


def test_a_vm_that_goes_away_mid_request_is_a_one_line_error(tmp_path, monkeypatch):
    """Before: a reset while reading the answer was a ConnectionResetError
    traceback out of `kvmkit kill` (seen in a loaded run)."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = control.socket_path("gone")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)

    def take_and_drop():                        # closes with the request unread: a reset
        conn, _ = lst.accept()
        time.sleep(0.2)
        conn.close()
    t = threading.Thread(target=take_and_drop, daemon=True)
    t.start()
    try:
        with pytest.raises(control.ControlError, match="without answering"):
            control.request("gone", "kill", wait_s=DEADLINE_S)
    finally:
        t.join(DEADLINE_S)
        lst.close()


def test_a_wait_still_queued_when_the_vm_stops_is_answered(server):
    """`kvmkit kill` asks "wait" on a new connection right after "kill"; the VM
    may be closing its socket by then.  Before: close() closed the listener
    with the connection still queued, and the client got a reset."""
    from kvmkit.testing import descriptors_exhausted
    first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(DEADLINE_S)
    try:
        with descriptors_exhausted():
            # A blocked accept() holds the descriptor it will return: `first`
            # takes that one, and the accept thread has none for `c`.
            first.connect(str(server.path))
            time.sleep(0.3)
            c.connect(str(server.path))
            c.sendall(b'{"cmd": "wait"}\n')
            server.stopped("killed through the control socket", 3)
        first.close()
        server.close()                          # as kvmkit run does once the VM stopped
        assert json.loads(c.makefile("rb").readline()) == {
            "ok": True, "result": {"reason": "killed through the control socket", "exit_code": 3}}
    finally:
        first.close()
        c.close()


def test_close_waits_for_a_client_that_connected_before_it(server):
    c = Client(server.path)
    server.stopped("guest powered off", 0)
    closer = threading.Thread(target=server.close)
    closer.start()
    try:
        time.sleep(0.2)                          # close() is under way
        assert not server.path.exists()          # no new client can connect
        assert c.ask(b'{"cmd": "wait"}') == {"ok": True, "result": {"reason": "guest powered off",
                                                                   "exit_code": 0}}
    finally:
        c.close()
        closer.join(DEADLINE_S)
    assert not closer.is_alive()


def run_cli(*argv) -> int:
    """`kvmkit ARGV` in this process; fails (never hangs) if it has not
    returned within the deadline."""
    from kvmkit.cli import main
    done: list = []
    t = threading.Thread(target=lambda: done.append(main(list(argv))), daemon=True)
    t.start()
    t.join(DEADLINE_S)
    assert done, f"kvmkit {' '.join(argv)} did not return within {DEADLINE_S} s"
    return done[0]


def test_kill_asks_wait_on_the_same_connection_and_reports_the_exit_status(server, capsys):
    """Before: `kvmkit kill` asked "wait" on a second connection, which a VM
    that stopped at once had closed or never accepted: a reset traceback (rc 1)
    or "no VM named ... is running" (rc 2), each seen in a loaded run."""
    def stops_at_once(reason, code):            # as `kvmkit run` does for a tiny VM
        FakeMachine.request_stop(server.machine, reason, code)
        threading.Thread(target=lambda: (server.stopped(reason, code), server.close()),
                         daemon=True).start()
    server.machine.request_stop = stops_at_once
    assert run_cli("kill", "vm") == 0
    assert "vm: killed through the control socket (exit status 3)" in capsys.readouterr().out


def test_close_waits_for_the_wait_owed_after_a_kill(server):
    """A kill's connection is owed its "wait" answer: close() does not go
    between the kill's answer and the "wait" that follows it."""
    c = Client(server.path)
    try:
        assert c.ask(b'{"cmd": "kill"}') == {"ok": True, "result": {"stopping": True}}
        server.stopped("killed through the control socket", 3)
        closer = threading.Thread(target=server.close)
        closer.start()
        time.sleep(0.3)                          # the client is slow to ask
        assert closer.is_alive()
        assert c.ask(b'{"cmd": "wait"}')["result"]["exit_code"] == 3
        closer.join(DEADLINE_S)
        assert not closer.is_alive()
    finally:
        c.close()


def test_kill_reports_a_vm_that_went_before_answering_wait(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    path = control.socket_path("gone")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(str(path))
    lst.listen(1)

    def answer_kill_then_go():
        conn, _ = lst.accept()
        with conn, conn.makefile("rb") as f:
            assert json.loads(f.readline()) == {"cmd": "kill"}
            conn.sendall(b'{"ok": true, "result": {"stopping": true}}\n')
    t = threading.Thread(target=answer_kill_then_go, daemon=True)
    t.start()
    try:
        assert run_cli("kill", "gone") == 0
        assert "gone: stopped (it ended before it could report its exit status)" in capsys.readouterr().out
    finally:
        t.join(DEADLINE_S)
        lst.close()


def test_two_closes_at_once_close_once(tmp_path, monkeypatch):
    """A loaded run caught close() racing itself (the VM's stop and a second
    caller): both passed the "already closed" check, and one got EBADF."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    errors: list = []

    def close(srv):
        try:
            srv.close()
        except Exception as e:                   # noqa: BLE001 - what the race raised
            errors.append(e)
    for i in range(100):
        srv = ControlServer(FakeMachine(), f"vm{i}")
        srv.stopped("test over", 0)
        threads = [threading.Thread(target=close, args=(srv,)) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE_S)
        assert not any(t.is_alive() for t in threads)
    assert errors == []
