"""The serial8250 plugin through FakeContext: spec, wiring and the backends."""
import importlib.metadata
import os
import select
import socket
import stat
import termios
import threading
import time
import tty
import tomllib
from pathlib import Path

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_serial8250.plugin import plugin
from kvmkit_serial8250 import uart as u
from kvmkit_serial8250.plugin import INPUT_LIMIT, SPEC, SerialPort

COM1 = 0x3F8


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def guest_write(ctx, text: bytes, port=COM1):
    for b in text:
        pio(ctx, port + u.THR, value=b)


def guest_read(ctx, port=COM1) -> bytes:
    data = bytearray()
    while pio(ctx, port + u.LSR) & u.LSR_DR:
        data.append(pio(ctx, port + u.RBR))
    return bytes(data)


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="serial8250", config=config(SPEC, **values), ctx=ctx)


# -- spec and wiring ------------------------------------------------------------------------
def test_spec_keys():
    keys = {k.name: k for k in SPEC.keys}
    assert list(keys) == ["port", "irq", "backend", "path"]
    assert keys["port"].type is int and keys["port"].default == 0x3F8
    assert keys["irq"].type is int and keys["irq"].default is None
    assert keys["backend"].default == "stdio"
    assert keys["backend"].choices == ("stdio", "file", "socket")
    assert keys["path"].type is Path and keys["path"].default is None
    assert plugin.kvmkit_device_spec() is SPEC


def test_other_kinds_are_not_ours(tmp_path):
    with FakeContext() as ctx:
        assert plugin.kvmkit_create_device(kind="rtc", config=config(SPEC), ctx=ctx) is None
        assert ctx.io["pio"] == []


@pytest.mark.parametrize("port,irq", [(0x3F8, 4), (0x2F8, 3), (0x3E8, 4), (0x2E8, 3)])
def test_registers_eight_ports_and_the_standard_irq(tmp_path, port, irq):
    with FakeContext() as ctx:
        dev = create(ctx, port=port, backend="file", path=tmp_path / "log")
        [(base, size, handler)] = ctx.io["pio"]
        assert (base, size) == (port, 8) and handler is dev.uart
        assert list(ctx.irqs) == [irq]
        dev.close()


def test_explicit_irq_for_an_odd_port(tmp_path):
    with FakeContext() as ctx:
        dev = create(ctx, port=0x500, irq=5, backend="file", path=tmp_path / "log")
        assert list(ctx.irqs) == [5]
        dev.close()


def test_odd_port_without_irq_is_an_error(tmp_path):
    with FakeContext() as ctx, pytest.raises(DeviceError, match=r"port 0x500 has no standard IRQ"):
        create(ctx, port=0x500, backend="file", path=tmp_path / "log")


@pytest.mark.parametrize("backend", ["file", "socket"])
def test_backend_needs_a_path(backend):
    with FakeContext() as ctx, pytest.raises(DeviceError, match=f"backend '{backend}' needs path"):
        create(ctx, backend=backend)


def test_stdio_takes_no_path(tmp_path):
    with FakeContext() as ctx, pytest.raises(DeviceError, match="path is only used with"):
        create(ctx, backend="stdio", path=tmp_path / "x")


def test_pyproject_declares_the_entry_point():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-serial8250"
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {"serial8250": "kvmkit_serial8250.plugin:plugin"}


def test_installed_entry_point_loads_this_plugin():
    try:
        importlib.metadata.distribution("kvmkit-serial8250")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmkit-serial8250 is not installed")
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices") if e.name == "serial8250"]
    assert ep.load() is plugin


# -- file backend -----------------------------------------------------------------------
def test_file_backend_appends_guest_output(tmp_path):
    log = tmp_path / "console.log"
    log.write_bytes(b"earlier\n")
    with FakeContext() as ctx:
        dev = create(ctx, backend="file", path=log)
        dev.start()
        guest_write(ctx, b"Linux version 6.1\r\n")
        dev.close()
    assert log.read_bytes() == b"earlier\nLinux version 6.1\r\n"


def test_file_backend_unwritable_path(tmp_path):
    with FakeContext() as ctx, pytest.raises(DeviceError, match="cannot open"):
        create(ctx, backend="file", path=tmp_path / "missing-dir" / "log")


def test_guest_interrupts_reach_the_irq_line(tmp_path):
    with FakeContext() as ctx:
        dev = create(ctx, backend="file", path=tmp_path / "log")
        pio(ctx, COM1 + u.MCR, value=u.MCR_OUT2)
        pio(ctx, COM1 + u.IER, value=u.IER_THRI)
        assert ctx.irqs[4].level is True
        assert pio(ctx, COM1 + u.IIR) == u.IIR_THRI
        assert ctx.irqs[4].level is False
        dev.close()


# -- socket backend ---------------------------------------------------------------------
def connect(path: Path) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(str(path))
    return c


def recv_exactly(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    """Up to ``n`` bytes: fewer at EOF or when ``timeout`` seconds have passed."""
    data, deadline = b"", time.monotonic() + timeout
    while len(data) < n and time.monotonic() < deadline:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def test_socket_round_trip(tmp_path):
    path = tmp_path / "ttyS0.sock"
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        dev.start()
        client = connect(path)
        assert wait_for(lambda: dev.backend.connected)
        guest_write(ctx, b"login: ")
        assert recv_exactly(client, 7) == b"login: "
        client.sendall(b"root\r")
        got = bytearray()
        assert wait_for(lambda: got.extend(guest_read(ctx)) or bytes(got) == b"root\r")
        client.close()
        assert wait_for(lambda: not dev.backend.connected)
        dev.close()
    assert not path.exists()


def test_socket_output_is_dropped_without_a_client(tmp_path):
    path = tmp_path / "s"
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        dev.start()
        guest_write(ctx, b"nobody hears this")
        assert dev.backend.dropped == len(b"nobody hears this")
        client = connect(path)
        assert wait_for(lambda: dev.backend.connected)
        guest_write(ctx, b"hello")
        assert recv_exactly(client, 5) == b"hello"
        client.close()
        dev.close()


def test_socket_second_client_is_turned_away(tmp_path):
    path = tmp_path / "s"
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        dev.start()
        first = connect(path)
        assert wait_for(lambda: dev.backend.connected)
        second = connect(path)
        assert b"already has a client" in second.recv(200)
        assert second.recv(200) == b""
        guest_write(ctx, b"x")
        assert first.recv(1) == b"x"
        first.close()
        second.close()
        dev.close()


def test_socket_input_waits_for_a_slow_guest(tmp_path):
    """Back-pressure: more input than the device holds arrives whole and in order."""
    path = tmp_path / "s"
    payload = bytes(i % 251 for i in range(3 * INPUT_LIMIT))
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        pio(ctx, COM1 + u.FCR, value=0xC1)
        dev.start()
        client = connect(path)
        client.sendall(payload[:INPUT_LIMIT])         # fits the device's backlog
        rest = payload[INPUT_LIMIT:]
        got = bytearray()
        deadline = time.monotonic() + 20
        client.setblocking(False)
        while len(got) < len(payload) and time.monotonic() < deadline:
            if rest:
                try:
                    rest = rest[client.send(rest):]
                except BlockingIOError:
                    pass
            got += guest_read(ctx)
            assert dev.uart.pending_input <= INPUT_LIMIT
            time.sleep(0.001)
        assert bytes(got) == payload
        client.close()
        dev.close()


def test_stale_socket_file_is_replaced(tmp_path):
    path = tmp_path / "s"
    old = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old.bind(str(path))
    old.close()                                        # the file stays, nobody listens
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        dev.close()


def test_socket_in_use_is_an_error(tmp_path):
    path = tmp_path / "s"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with FakeContext() as ctx, pytest.raises(DeviceError, match="in use"):
            create(ctx, backend="socket", path=path)
        assert path.exists()
    finally:
        live.close()


def test_socket_path_that_is_a_regular_file_is_left_alone(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("keep me")
    with FakeContext() as ctx, pytest.raises(DeviceError, match="not a socket"):
        create(ctx, backend="socket", path=path)
    assert path.read_text() == "keep me"


# -- stdio backend ----------------------------------------------------------------------
def stdio_port(ctx, in_fd, out_fd):
    return SerialPort(config(SPEC), ctx, stdio_fds=(in_fd, out_fd))


def test_stdio_pipe_reads_until_eof(tmp_path):
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        with FakeContext() as ctx:
            dev = stdio_port(ctx, in_r, out_w)
            dev.start()
            os.write(in_w, b"echo \x01x hi\n")           # no escapes on a pipe
            os.close(in_w)
            in_w = -1
            assert wait_for(lambda: not dev.backend._thread.is_alive())   # EOF ends the reader
            assert dev.uart.rx_count == 1                # one byte in RBR, the rest waits
            assert dev.uart.pending_input == len(b"echo \x01x hi\n") - 1
            assert guest_read(ctx) == b"echo \x01x hi\n"
            guest_write(ctx, b"ok")
            assert os.read(out_r, 10) == b"ok"
            assert ctx.stop_requests == []
            dev.close()
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_stdio_dev_null(tmp_path):
    fd = os.open(os.devnull, os.O_RDWR)
    try:
        with FakeContext() as ctx:
            dev = stdio_port(ctx, fd, fd)
            dev.start()
            assert wait_for(lambda: not dev.backend._thread.is_alive())
            guest_write(ctx, b"discarded")
            dev.close()
    finally:
        os.close(fd)


def test_stdio_terminal_is_raw_and_restored(tmp_path):
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    try:
        with FakeContext() as ctx:
            dev = stdio_port(ctx, slave, slave)
            dev.start()
            assert dev.backend.raw_mode
            assert not termios.tcgetattr(slave)[3] & (termios.ICANON | termios.ECHO | termios.ISIG)
            os.write(master, b"a\x01\x01b")
            got = bytearray()
            assert wait_for(lambda: got.extend(guest_read(ctx)) or bytes(got) == b"a\x01b")
            os.write(master, b"\x01h")
            assert wait_for(lambda: b"Ctrl-A x" in os.read(master, 1000))
            os.write(master, b"\x01x")
            assert wait_for(lambda: ctx.stop_requests == [("user quit (Ctrl-A x)", 0)])
            assert wait_for(lambda: not dev.backend._thread.is_alive())
            dev.close()
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_ctrl_a_x_works_while_the_guest_reads_nothing():
    master, slave = os.openpty()
    try:
        with FakeContext() as ctx:
            dev = stdio_port(ctx, slave, slave)
            dev.start()
            backlog = bytes(i % 200 + 32 for i in range(INPUT_LIMIT + 1))   # + 1 in RBR
            dev.feed(backlog)                               # the device is full
            assert dev.room() == 0
            os.write(master, b"typed")                      # held by the backend
            assert wait_for(lambda: dev.backend._held == b"typed")
            got = bytearray()
            assert wait_for(lambda: got.extend(guest_read(ctx)) or len(got) == len(backlog) + 5)
            assert bytes(got) == backlog + b"typed"         # in order, nothing lost
            dev.feed(backlog)
            os.write(master, b"\x01x")
            assert wait_for(lambda: ctx.stop_requests == [("user quit (Ctrl-A x)", 0)])
            dev.close()
    finally:
        os.close(master)
        os.close(slave)


def test_only_one_stdio_console_per_stdin():
    r, w = os.pipe()
    try:
        with FakeContext() as ctx:
            first = stdio_port(ctx, r, w)
            with pytest.raises(DeviceError, match="already uses the stdio backend"):
                with FakeContext("serial8250.1") as ctx2:
                    SerialPort(config(SPEC, port=0x2F8), ctx2, stdio_fds=(r, w))
            first.close()
        with FakeContext() as ctx:
            second = stdio_port(ctx, r, w)                # free again once closed
            second.close()
    finally:
        os.close(r)
        os.close(w)


def test_reader_stops_promptly_when_the_vm_stops(tmp_path):
    r, w = os.pipe()
    try:
        ctx = FakeContext(join_timeout=1.0)
        dev = stdio_port(ctx, r, w)
        dev.start()
        time.sleep(0.05)
        t0 = time.monotonic()
        ctx.close()                                       # sets stopping, joins
        assert time.monotonic() - t0 < 1.0
        dev.close()
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("sink", ["pty", "pipe"])
def test_a_full_stdout_never_blocks_the_vcpu(sink):
    """A detached VM whose console client left: nobody reads the pty.  Before,
    the vCPU blocked in os.write holding the device lock once ~10 KB were
    written, and the guest hung.  Now output is kept up to OUT_LIMIT, the
    rest dropped and counted, and what was kept comes out once read."""
    if sink == "pty":
        reader, writer = os.openpty()
        tty.setraw(writer)
    else:
        reader, writer = os.pipe()
    in_r, in_w = os.pipe()
    total, limit = 90_000, 4096          # more than a pipe (64 KiB) and the kept bytes hold
    try:
        with FakeContext() as ctx:
            dev = stdio_port(ctx, in_r, writer)
            if hasattr(dev.backend, "out"):
                dev.backend.out.limit = limit
            dev.start()
            vcpu = threading.Thread(target=guest_write, args=(ctx, b"x" * total), daemon=True)
            vcpu.start()
            vcpu.join(30)
            blocked = vcpu.is_alive()
            got = bytearray()
            try:
                assert not blocked, "the vCPU blocked writing to a full stdout"
            finally:
                while select.select([reader], [], [], 0.5)[0]:   # unblocks the old code too
                    got += os.read(reader, 65536)
                vcpu.join(30)
                if blocked:
                    dev.close()
            dropped = dev.backend.out_dropped
            assert 0 < dropped <= total - limit
            assert len(got) == total - dropped and set(got) == {ord("x")}
            dev.close()
    finally:
        for fd in (reader, writer, in_r, in_w):
            os.close(fd)


def test_socket_rests_while_the_process_is_out_of_descriptors(tmp_path):
    """Before: accept() failing with EMFILE left the listener readable, and the
    backend's loop retried at once: a core at 100 % (0.998 s of CPU in 1.0 s)
    for as long as descriptors were short."""
    from kvmkit.host_socket import ACCEPT_RETRY_S
    from kvmkit.testing import descriptors_exhausted
    path = tmp_path / "s"
    with FakeContext() as ctx:
        dev = create(ctx, backend="socket", path=path)
        dev.start()
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with descriptors_exhausted():
            client.connect(str(path))              # queued: accept() fails meanwhile
            time.sleep(1.0)
        failures = dev.backend._acceptor.failures
        assert 1 <= failures <= 1.0 / ACCEPT_RETRY_S + 2, failures
        assert wait_for(lambda: dev.backend.connected)   # served once descriptors are back
        guest_write(ctx, b"hello")
        assert recv_exactly(client, 5) == b"hello"
        client.close()
        dev.close()
