"""The virtio-fs device model driven by kvmkit.testing's virtio test driver
(the guest's side, in guest memory): FUSE requests as chains, READ/WRITE
straight between guest buffers and the host file, the hiprio queue, the
config space and hostile chains."""
import errno
import os
import struct

import pytest

from fuseclient import Client
from kvmkit.memory import GuestMemory
from kvmkit.testing import VirtioTestDriver
from kvmkit.virtio.backends import resolve
from kvmkit_virtio_fs import fuse_proto as p
from kvmkit_virtio_fs.fs import MAX_REQUEST, TAG_BYTES, VirtioFs
from kvmkit_virtio_fs.fuse_server import FuseServer

MEM = 16 << 20
ROOT = p.ROOT_ID


class Guest:
    """The guest driver: FUSE requests on request queue 1 (or hiprio 0).
    ``queues="native"`` gives the device kvmkit-native's queues (parsed in C)
    over the same rings."""

    def __init__(self, dev, queues: str = "python", **kw):
        self.mem = GuestMemory(MEM, backing=bytearray(MEM))
        self.drv = VirtioTestDriver(dev, self.mem, buffers_at=1 << 20, **kw)
        if queues != "python":
            pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
            backend = resolve(queues, "test")
            ev, ind = (bool(self.drv.features >> b & 1) for b in (29, 28))
            native = [backend.split_queue(self.mem, q.size, *q.addresses, event_idx=ev,
                                          indirect=ind) for q in self.drv.queues]
            dev.activate(native, self.drv.features)
        self.dev = dev
        self.split = None               # split readable/writable into pieces of this size

    def _pieces(self, data: bytes) -> list[bytes]:
        if not self.split:
            return [data]
        return [data[i:i + self.split] for i in range(0, len(data), self.split)] or [b""]

    def send(self, raw: bytes, reply_size: int, queue: int = 1):
        writable = [reply_size] if not self.split else \
            [min(self.split, reply_size - i) for i in range(0, reply_size, self.split)]
        req = self.drv.submit(queue, readable=self._pieces(raw), writable=writable)
        used = self.drv.notify(queue)
        assert [h for h, _ in used] == [req.head]
        n = used[0][1]
        return self.drv.written(req, n) if n else None


@pytest.fixture
def share(tmp_path):
    d = tmp_path / "share"
    d.mkdir()
    return d


@pytest.fixture(params=["python", "native"])
def guest(share, request):
    dev = VirtioFs(FuseServer(share, xattr=True), "myshare")
    g = Guest(dev, queues=request.param)
    g.client = Client(g.send)
    g.client.init()
    yield g
    dev.close()


def test_identity_and_config_space(share):
    dev = VirtioFs(FuseServer(share), "myshare", request_queues=3)
    assert dev.device_id == 26 and list(dev.queue_sizes) == [128, 1024, 1024, 1024]
    cfg = dev.config_bytes()
    assert len(cfg) == TAG_BYTES + 4
    assert cfg[:TAG_BYTES] == b"myshare".ljust(TAG_BYTES, b"\0")
    assert struct.unpack_from("<I", cfg, TAG_BYTES)[0] == 3
    assert dev.config_read(TAG_BYTES, 4) == 3
    dev.close()


@pytest.mark.parametrize("tag", ["", "x" * 37, "a\0b"])
def test_bad_tags(share, tag):
    with pytest.raises(ValueError):
        VirtioFs(FuseServer(share), tag)


def test_a_session_through_guest_memory(guest, share):
    c = guest.client
    d, _ = c.mkdir(ROOT, b"dir")
    f, fh = c.create(d, b"file")
    data = os.urandom(200_000)
    assert c.write(f, fh, 0, data) == len(data)
    assert (share / "dir" / "file").read_bytes() == data
    assert c.read(f, fh, 1000, 5000) == data[1000:6000]
    assert set(c.listdir(ROOT, plus=True)) == {b".", b"..", b"dir"}


def test_read_and_write_across_many_guest_buffers(guest, share):
    """Scatter-gather: the WRITE's data and READ's reply span many small
    descriptors; preadv/pwritev move them without reassembly."""
    c = guest.client
    f, fh = c.create(ROOT, b"sg")
    guest.split = 4096 + 17                  # odd-sized pieces, the header split too
    data = os.urandom(100_000)
    assert c.write(f, fh, 3, data) == len(data)
    assert (share / "sg").read_bytes() == b"\0" * 3 + data
    assert c.read(f, fh, 3, len(data)) == data
    guest.split = 7
    assert c.read(f, fh, 0, 64) == (b"\0" * 3 + data)[:64]


def test_read_goes_straight_into_guest_memory(guest, share, monkeypatch):
    (share / "f").write_bytes(b"A" * 8192)
    c = guest.client
    f, _ = c.lookup(ROOT, b"f")
    fh = c.open(f)
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, views, off: (calls.append(len(views)),
                                                               real(fd, views, off))[1])
    monkeypatch.setattr(os, "pread", lambda *a: pytest.fail("READ copied through pread"))
    assert c.read(f, fh, 0, 8192) == b"A" * 8192
    assert calls == [1]


def test_forget_on_the_hiprio_queue_has_no_reply(guest, share):
    (share / "f").write_text("")
    c = guest.client
    f, _ = c.lookup(ROOT, b"f")
    raw = p.request(p.FORGET, f, p.FORGET_IN.pack(1), unique=99)
    assert guest.send(raw, 64, queue=0) is None            # used length 0
    assert guest.dev.server.inode_count == 1
    assert pytest.raises(OSError, c.getattr, f).value.errno == errno.ESTALE


def test_oversized_request_is_refused_unread(guest):
    raw = p.request(p.SETXATTR, ROOT, b"x" * MAX_REQUEST)
    out = guest.send(raw, 64)
    assert p.OUT_HEADER.unpack(out[:16]) == (16, -errno.E2BIG, 1)


def test_reply_larger_than_the_guest_buffer_is_eio(guest, share):
    raw = p.request(p.GETATTR, ROOT, p.GETATTR_IN.pack(0, 0, 0), unique=5)
    out = guest.send(raw, 40)                              # attr_out needs 16 + 104
    assert p.OUT_HEADER.unpack(out) == (16, -errno.EIO, 5)


def test_short_chains_get_einval_or_nothing(guest):
    out = guest.send(b"\x01" * 10, 64)
    assert p.OUT_HEADER.unpack(out) == (16, -errno.EINVAL, 0)
    req = guest.drv.submit(1, readable=[b"\x01" * 10], writable=[8])   # no room for a header
    assert guest.drv.notify(1) == [(req.head, 0)]


def test_reset_starts_a_new_session(guest, share):
    (share / "f").write_text("")
    c = guest.client
    f, _ = c.lookup(ROOT, b"f")
    guest.drv.reset()
    assert guest.dev.server.inode_count == 1 and not guest.dev.server.initialized
    g = Guest(guest.dev)
    c2 = Client(g.send)
    assert c2.raw(p.GETATTR, f, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.EIO    # before INIT
    c2.init()
    assert c2.raw(p.GETATTR, f, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.ESTALE  # old ids gone


def test_readonly_device(share):
    (share / "f").write_text("keep")
    dev = VirtioFs(FuseServer(share, readonly=True), "ro")
    g = Guest(dev)
    c = Client(g.send)
    c.init()
    assert pytest.raises(OSError, c.create, ROOT, b"new").value.errno == errno.EROFS
    f, _ = c.lookup(ROOT, b"f")
    assert c.read(f, c.open(f), 0, 10) == b"keep"
    dev.close()


@pytest.mark.parametrize("event_idx, indirect", [(True, False), (False, True)])
def test_ring_features(share, event_idx, indirect):
    (share / "f").write_bytes(b"x" * 100)
    dev = VirtioFs(FuseServer(share), "t")
    g = Guest(dev, event_idx=event_idx, indirect=indirect)
    c = Client(g.send)
    c.init()
    f, _ = c.lookup(ROOT, b"f")
    fh = c.open(f)
    for i in range(3 * 1024 // 2):           # wrap the 1024-entry ring a few times
        assert c.read(f, fh, i % 100, 1) == b"x"
    dev.close()


# -- snapshots ------------------------------------------------------------------------------
def test_snapshot_is_refused_while_the_guest_has_the_share_mounted(share):
    from kvmkit.plugin_api import StateUnsupported
    dev = VirtioFs(FuseServer(share), "myshare")
    g = Guest(dev)
    assert dev.snapshot_state() == {"version": 1, "served": 0}      # never mounted: nothing lost
    g.client = Client(g.send)
    g.client.init()
    with pytest.raises(StateUnsupported, match="myshare: the guest has the share mounted.*umount"):
        dev.snapshot_state()
    g.send(p.IN_HEADER.pack(p.IN_HEADER.size, p.DESTROY, 99, 0, 0, 0, 0, 0, 0), 16)   # umount
    assert dev.snapshot_state() == {"version": 1, "served": 2}
    dev.close()
