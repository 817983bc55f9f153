"""kvmkit.host_socket.Acceptor, with a listener that fails as one does when the
process is out of descriptors, and a clock the test moves."""
import errno
import socket

import pytest

from kvmkit.host_socket import Acceptor


class FailingListener:
    def __init__(self, err: int):
        self.err = err
        self.calls = 0

    def accept(self):
        self.calls += 1
        raise OSError(self.err, "Too many open files")


class Clock:
    def __init__(self):
        self.now = 100.0                

    def __call__(self):
        return self.now


def test_a_failed_accept_rests_the_listener_then_retries():
    clock, listener = Clock(), FailingListener(errno.EMFILE)
    a = Acceptor(listener, "test socket", retry_s=0.1, clock=clock)
    assert a.wanted() and a.timeout(0.2) == 0.2 and a.timeout() is None
    assert a.accept() is None and a.failures == 1 and not a.gone
    assert not a.wanted()
    assert a.timeout() == pytest.approx(0.1) and a.timeout(0.05) == 0.05
    clock.now += 0.25                      # the rest ended after wanted() said "rest"
    assert a.timeout() == 0.0              # never None: the loop must come round to poll it
    assert a.wanted() and a.timeout() is None


def test_a_closed_listener_is_gone_not_retried():
    clock, listener = Clock(), FailingListener(errno.EBADF)
    a = Acceptor(listener, "test socket", clock=clock)
    assert a.accept() is None and a.gone and a.failures == 0
    assert not a.wanted() and a.timeout(0.2) == 0.2


def test_nobody_waiting_is_none_without_a_rest(tmp_path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(tmp_path / "l"))
    s.listen(1)
    s.setblocking(False)
    a = Acceptor(s, "test socket")
    try:
        assert a.accept() is None and a.failures == 0 and a.wanted()
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "l"))
        conn = a.accept()
        assert conn is not None
        conn.close()
        c.close()
    finally:
        s.close()
