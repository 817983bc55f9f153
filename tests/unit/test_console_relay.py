"""ConsoleRelay (kvmkit.console): a detached VM's pty bridged to a socket,
with clients that misbehave."""
import os
import select
import socket
import threading
import time
import tty

import pytest

from kvmkit.console import ConsoleRelay
from kvmkit.control import console_path
from kvmkit.host_socket import ACCEPT_RETRY_S


@pytest.fixture
def relay(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    master, slave = os.openpty()
    tty.setraw(slave)
    r = ConsoleRelay(master, "vm")
    r.slave = slave
    yield r
    r.close()
    os.close(master)
    os.close(slave)


def connect(name="vm") -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(console_path(name)))
    return s


def guest_prints(r, total: int, timeout: float = 20) -> bool:
    """The guest writes ``total`` bytes to its console; False if it blocked."""
    def write():
        view = memoryview(b"g" * total)
        while view:
            view = view[os.write(r.slave, view):]
    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive()


def read_until(s, needle: bytes, timeout: float = 5) -> bytes:
    got = bytearray()
    while needle not in got and select.select([s], [], [], timeout)[0]:
        data = s.recv(65536)
        if not data:
            break
        got += data
    return bytes(got)


def test_a_client_that_resets_the_connection_does_not_kill_the_relay(relay):
    """Before: recv() raised ConnectionResetError, the relay thread died, the
    pty filled and the guest's console (and with it the guest) hung."""
    os.write(relay.slave, b"boot log\r\n")
    c = connect()
    c.send(b"typed")
    read_until(c, b"boot log")
    os.write(relay.slave, b"more output the client never reads\r\n" * 100)
    c.close()                              # unread data queued: the relay's recv sees a reset
    assert guest_prints(relay, 200_000), "the guest blocked writing its console"
    assert relay.thread.is_alive()
    again = connect()
    try:
        os.write(relay.slave, b"still here\r\n")
        assert b"still here" in read_until(again, b"still here")
    finally:
        again.close()


def test_a_client_that_stops_reading_never_blocks_the_guest(relay):
    """Before: sendall() to a client that read nothing blocked the relay,
    the pty filled and the guest blocked."""
    c = connect()
    try:
        assert guest_prints(relay, 1_000_000), "the guest blocked writing its console"
        assert relay.thread.is_alive() and relay.client is None    # the stalled client was let go
    finally:
        c.close()


def test_input_for_a_guest_that_reads_nothing_is_dropped_not_waited_for(relay):
    c = connect()
    try:
        c.setblocking(False)
        for _ in range(200):               # the guest never reads its terminal
            try:
                c.send(b"k" * 4096)
            except BlockingIOError:
                break
        assert guest_prints(relay, 100_000)
        assert relay.thread.is_alive()
    finally:
        c.close()


def test_running_out_of_descriptors_does_not_end_the_relay(relay):
    """Before: accept() raised EMFILE out of the relay's loop, the relay thread
    died, and nobody could attach again (and the pty was no longer read)."""
    from kvmkit.testing import descriptors_exhausted
    os.write(relay.slave, b"before\r\n")
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with descriptors_exhausted():
            c.connect(str(console_path("vm")))     # queued: accept() fails meanwhile
            time.sleep(1.0)
        assert relay.thread.is_alive()
        assert relay.acceptor.failures <= 1.0 / ACCEPT_RETRY_S + 2   # rested, did not spin
        assert b"before" in read_until(c, b"before")   # attached once descriptors were back
        assert guest_prints(relay, 200_000), "the guest blocked writing its console"
    finally:
        c.close()
