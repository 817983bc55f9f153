"""The plugin's wiring: keys, backends on real fds, threads through FakeContext."""
import importlib.metadata
import os
import socket
import time
import tomllib
from pathlib import Path

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import FakeContext, config
from kvmkit_virtio_console import backends
from kvmkit_virtio_console import multiport as mp
from kvmkit_virtio_console.console import CONTROL_RX, CONTROL_TX, rx_index, tx_index
from kvmkit_virtio_console.plugin import SPEC, ConsoleDevice, parse_port, plugin

HERE = Path(__file__).parents[1]


def create(ctx, fds=(0, 1, 2), **values):
    return ConsoleDevice(config(SPEC, **values), ctx, stdio_fds=fds)


def wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


class Guest:
    """The guest side through the test driver; kicks that the device asks for
    (wake) are served when the test calls pump()."""

    def __init__(self, dev, virtqueue_driver, ctx):
        self.model = dev.model
        self.woken = []
        self.model._wake = self.woken.append
        self.drv = virtqueue_driver(self.model, lock=ctx.lock)
        self.posted = {}
        self.control_posted = {}

    def send(self, *msgs):
        for m in msgs:
            self.drv.submit(CONTROL_TX, readable=[m.encode()])
        self.drv.notify(CONTROL_TX)

    def control(self):
        while len(self.control_posted) < 8:
            r = self.drv.submit(CONTROL_RX, writable=[300])
            self.control_posted[r.head] = r
        return [mp.Message.decode(self.drv.written(self.control_posted.pop(h), n))
                for h, n in self.drv.notify(CONTROL_RX)]

    def read(self, port, size=256):
        q = rx_index(port)
        posted = self.posted.setdefault(port, {})
        while len(posted) < 4:
            r = self.drv.submit(q, writable=[size])
            posted[r.head] = r
        return b"".join(self.drv.written(posted.pop(h), n) for h, n in self.drv.notify(q))

    def write(self, port, data):
        self.drv.submit(tx_index(port), readable=[data])
        return self.drv.notify(tx_index(port))


def test_spec_and_entry_point():
    assert [k.name for k in SPEC.keys] == ["backend", "path", "ports", "multiport", "queue"]
    assert all(k.doc for k in SPEC.keys)
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices")
            if e.name == "virtio-console"]
    assert ep.load() is plugin
    meta = tomllib.loads((HERE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-virtio-console"


def test_readme_documents_every_key_and_backend():
    readme = (HERE / "README.md").read_text()
    assert all(f"`{k.name}`" in readme for k in SPEC.keys)
    assert all(f"`{b}`" in readme for b in ("stdout", "stderr", "stdin", "feed", "socket"))


@pytest.mark.parametrize("text, error", [
    ("noequals", "NAME=BACKEND"), ("=stdout", "NAME=BACKEND"), ("a=tape", "not one of"),
    ("a=file", "needs a path"), ("a=stdout:/x", "takes no path"), ("a/b=none", "without '/'"),
])
def test_bad_port_entries(text, error):
    with pytest.raises(DeviceError, match=error):
        parse_port(text, "m.toml: device[0]")


def test_bad_tables(tmp_path):
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match="needs path"):
            create(ctx, backend="file")
        with pytest.raises(DeviceError, match="twice"):
            create(ctx, backend="none", ports=["a=none", "a=none"])
        with pytest.raises(DeviceError, match="multiport"):
            create(ctx, backend="none", ports=["a=none"], multiport=False)
        with pytest.raises(DeviceError, match="both read stdin"):
            create(ctx, backend="stdio", ports=["in=stdin"])
        with pytest.raises(DeviceError, match="cannot read"):
            create(ctx, backend="none", ports=[f"job=feed:{tmp_path}/missing"])
    with FakeContext() as ctx:                           # the failed ones gave stdin back
        create(ctx, backend="none", ports=["in=stdin"]).close()


def test_stdout_and_stderr_ports_reach_their_fds(virtqueue_driver):
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    with FakeContext() as ctx:
        dev = create(ctx, fds=(-1, out_w, err_w), backend="none",
                     ports=["out=stdout", "err=stderr"])
        dev.start()
        g = Guest(dev, virtqueue_driver, ctx)
        g.send(mp.Message(0, mp.DEVICE_READY, 1), mp.Message(1, mp.PORT_READY, 1),
               mp.Message(2, mp.PORT_READY, 1))
        answers = g.control()
        assert mp.Message(1, mp.PORT_NAME, 0, b"out") in answers
        assert mp.Message(2, mp.PORT_OPEN, 1) in answers
        g.write(1, b"out\n")
        g.write(2, b"err\n")
        dev.close()
    os.close(out_w)
    os.close(err_w)
    assert os.read(out_r, 100) == b"out\n" and os.read(err_r, 100) == b"err\n"


def test_a_slow_reader_slows_the_guest_down_without_losing_output(virtqueue_driver, monkeypatch):
    monkeypatch.setattr(backends, "OUT_LIMIT", 8192)
    r, w = os.pipe()
    got = bytearray()

    def slow_reader():
        while len(got) < 64 * 4096:
            time.sleep(0.002)
            got.extend(os.read(r, 4096))

    with FakeContext() as ctx:
        dev = create(ctx, fds=(-1, w, -1), backend="none", ports=["out=stdout"])
        dev.start()
        g = Guest(dev, virtqueue_driver, ctx)
        g.send(mp.Message(0, mp.DEVICE_READY, 1), mp.Message(1, mp.PORT_READY, 1))
        chunk = bytes(range(256)) * 16                     # 4 KiB
        for _ in range(64):                                # 256 KiB through a 64 KiB pipe
            g.drv.submit(tx_index(1), readable=[chunk])
        taken = len(g.drv.notify(tx_index(1)))
        assert taken < 64                                  # the guest waits for the host
        ctx.spawn("slow-reader", slow_reader)
        waits = 0
        while taken < 64:
            assert wait_for(lambda: tx_index(1) in g.woken), f"no wake-up after {taken} chains"
            g.woken.clear()
            waits += 1
            taken += len(g.drv.notify(tx_index(1)))
        dev.close()                                        # flushes what is buffered
        assert wait_for(lambda: len(got) == 64 * 4096)
    os.close(w)
    os.close(r)
    assert bytes(got) == chunk * 64 and waits > 1


def test_stdin_is_forwarded_and_its_eof_hangs_the_port_up(virtqueue_driver):
    r, w = os.pipe()
    with FakeContext() as ctx:
        dev = create(ctx, fds=(r, -1, -1), backend="none", ports=["in=stdin"])
        dev.start()
        g = Guest(dev, virtqueue_driver, ctx)
        g.send(mp.Message(0, mp.DEVICE_READY, 1), mp.Message(1, mp.PORT_READY, 1),
               mp.Message(1, mp.PORT_OPEN, 1))
        g.control()
        os.write(w, b"line one\n")
        os.close(w)
        got = b""
        assert wait_for(lambda: dev.model.ports[1].pending or 1 not in
                        dev.model.protocol.host_connected or
                        not dev.model.protocol.host_connected[1])
        deadline = time.monotonic() + 5
        hung_up = False
        while time.monotonic() < deadline and not hung_up:
            got += g.read(1)
            hung_up = mp.Message(1, mp.PORT_OPEN, 0) in g.control()
            time.sleep(0.01)
        dev.close()
    os.close(r)
    assert got == b"line one\n" and hung_up


def test_feed_gives_the_file_then_eof(virtqueue_driver, tmp_path):
    (tmp_path / "job").write_bytes(b"argv\0sh\0")
    with FakeContext() as ctx:
        dev = create(ctx, backend="none", ports=[f"job=feed:{tmp_path}/job"])
        dev.start()
        g = Guest(dev, virtqueue_driver, ctx)
        g.send(mp.Message(0, mp.DEVICE_READY, 1), mp.Message(1, mp.PORT_READY, 1))
        assert mp.Message(1, mp.PORT_OPEN, 1) in g.control()
        g.send(mp.Message(1, mp.PORT_OPEN, 1))
        assert g.read(1) == b"argv\0sh\0"
        assert g.control() == [mp.Message(1, mp.PORT_OPEN, 0)]
        dev.close()


def test_file_console_appends(virtqueue_driver, tmp_path):
    log = tmp_path / "hvc0.log"
    log.write_bytes(b"old\n")
    with FakeContext() as ctx:
        dev = create(ctx, backend="file", path=log)
        dev.start()
        g = Guest(dev, virtqueue_driver, ctx)
        g.write(0, b"[    0.000000] Linux version\n")
        dev.close()
    assert log.read_bytes() == b"old\n[    0.000000] Linux version\n"


def socket_port(ctx, virtqueue_driver, path):
    """A started device whose port 1 is a socket at ``path``, its driver ready
    and the port opened by the guest: (device, guest)."""
    dev = create(ctx, backend="none", ports=[f"ctl=socket:{path}"])
    dev.start()
    g = Guest(dev, virtqueue_driver, ctx)
    g.send(mp.Message(0, mp.DEVICE_READY, 1), mp.Message(1, mp.PORT_READY, 1),
           mp.Message(1, mp.PORT_OPEN, 1))
    return dev, g


def test_socket_port_connects_and_hangs_up(virtqueue_driver, tmp_path):
    path = tmp_path / "p.sock"
    with FakeContext() as ctx:
        dev, g = socket_port(ctx, virtqueue_driver, path)
        assert mp.Message(1, mp.PORT_OPEN, 1) not in g.control()      # no client yet
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))
        assert wait_for(lambda: dev.model.protocol.host_connected[1])
        assert g.control() == [mp.Message(1, mp.PORT_OPEN, 1)]
        g.write(1, b"to host")
        client.settimeout(5)
        assert client.recv(100) == b"to host"
        client.sendall(b"to guest")
        assert wait_for(lambda: dev.model.ports[1].pending)
        assert g.read(1) == b"to guest"
        client.close()
        assert wait_for(lambda: not dev.model.protocol.host_connected[1])
        assert g.control() == [mp.Message(1, mp.PORT_OPEN, 0)]
        dev.close()
    assert not path.exists()


def test_socket_port_rests_while_the_process_is_out_of_descriptors(virtqueue_driver, tmp_path):
    """Before: accept() failing with EMFILE left the listener readable and the
    port's loop retried at once, a core at 100 % while descriptors were short."""
    from kvmkit.host_socket import ACCEPT_RETRY_S
    from kvmkit.testing import descriptors_exhausted
    path = tmp_path / "p.sock"
    with FakeContext() as ctx:
        dev, g = socket_port(ctx, virtqueue_driver, path)
        client = socket.socket(socket.AF_UNIX)
        with descriptors_exhausted():
            client.connect(str(path))              # queued: accept() fails meanwhile
            time.sleep(1.0)
        backend = next(end for _, end in dev.backends if isinstance(end, backends.SocketBackend))
        assert 1 <= backend._acceptor.failures <= 1.0 / ACCEPT_RETRY_S + 2, backend._acceptor.failures
        assert wait_for(lambda: dev.model.protocol.host_connected[1])   # served once they are back
        g.write(1, b"to host")
        client.settimeout(5)
        assert client.recv(100) == b"to host"
        client.close()
        dev.close()
