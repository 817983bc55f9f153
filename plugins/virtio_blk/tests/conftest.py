"""A guest driver for virtio-blk built on kvmkit's virtqueue driver model."""
from __future__ import annotations

import array
import dataclasses
import os
import pathlib
import select
import shutil
import tempfile
import time

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                                  VIRTIO_F_VERSION_1)
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.testing import EngineHost
from kvmkit.virtio.backends import resolve
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.backend import FileBackend
from kvmkit_virtio_blk.blk import QUEUE_SIZE, VirtioBlk

MEM_SIZE = 8 << 20
DATA_BASE = 0x100000          # request buffers are allocated from here


BACKENDS = ("python", "native")


def queue_backend(name: str):
    """The queue backend ``name``; skips the test when it is not installed."""
    if name == "native":
        pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed (pip install ./native)")
    return resolve(name, "test")


@dataclasses.dataclass
class Request:
    head: int
    status_gpa: int | None      # the last writable byte, where the status goes
    in_bufs: list[tuple[int, int]]


class BlkDriver:
    """Plays the guest's virtio-blk driver against a :class:`VirtioBlk`.

    ``submit`` lays out one request (header, data, status) in guest memory
    and makes it available; ``run`` notifies the device (``process(0)``) and
    returns the used elements.  The convenience methods do both.
    """

    def __init__(self, dev: VirtioBlk, *, event_idx: bool = False, indirect: bool = True,
                 features: int | None = None, mem_size: int = MEM_SIZE, queues: str = "python"):
        self.dev = dev
        backend = queue_backend(queues)
        self.host = EngineHost() if queues != "python" else None
        dev.queue_backend, dev.host = backend, self.host
        self.mem = GuestMemory(mem_size, backing=bytearray(mem_size))
        self.rings = GuestAllocator(self.mem, 0x1000, DATA_BASE)
        self.alloc = GuestAllocator(self.mem, DATA_BASE)
        self.drv = DriverQueue(self.mem, QUEUE_SIZE, self.rings, indirect_max=32,
                               event_idx=event_idx)
        self.queue = backend.split_queue(self.mem, QUEUE_SIZE, *self.drv.addresses,
                                         event_idx=event_idx, indirect=indirect)
        if features is None:
            features = dev.features | (1 << VIRTIO_F_VERSION_1)
            features |= (1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0
            features |= (1 << VIRTIO_F_RING_INDIRECT_DESC) if indirect else 0
        dev.activate([self.queue], features)
        self.completed: dict[int, int] = {}

    # -- building requests --------------------------------------------------------------
    def buffers(self, data: bytes = b"", length: int = 0, split: tuple[int, ...] = (),
                misalign: int = 0):
        """Guest buffers holding ``data`` (or ``length`` zero bytes) cut at ``split`` sizes."""
        total = len(data) if data else length
        sizes = list(split) or [total]
        if sum(sizes) != total:
            sizes.append(total - sum(sizes))
        out, pos = [], 0
        for n in sizes:
            gpa = self.alloc.alloc(n + misalign, 512) + misalign
            if data:
                self.mem.write(gpa, data[pos:pos + n])
            out.append((gpa, n))
            pos += n
        return [b for b in out if b[1]]

    def submit(self, rtype: int, sector: int = 0, out: bytes = b"", in_len: int = 0, *,
               split: tuple[int, ...] = (), indirect: bool = False, misalign: int = 0,
               header: bytes | None = None, status_len: int = 1) -> Request:
        hdr = p.HEADER.pack(rtype, 0, sector) if header is None else header
        readable = [(self.alloc.put(hdr), len(hdr))] if hdr else []
        writable = []
        if out:
            readable += self.buffers(out, split=split, misalign=misalign)
        in_bufs = self.buffers(length=in_len, split=split, misalign=misalign) if in_len else []
        writable += in_bufs
        status_gpa = self.alloc.alloc(status_len, 1) if status_len else 0
        if status_len:
            self.mem.write(status_gpa, b"\xee" * status_len)
            writable.append((status_gpa, status_len))
        head = self.drv.add(readable, writable, indirect=indirect)
        return Request(head, status_gpa + status_len - 1 if status_len else None, in_bufs)

    def run(self) -> dict[int, int]:
        engine = self.host.engines.get(0) if self.host else None
        if engine is None:
            self.dev.process(0)
            used = dict(self.drv.used())
        else:                             # the engine's thread serves; Python what it hands back
            self.host.kick()
            deadline = time.monotonic() + 10
            while ((self.drv.used_idx - self.drv.last_used_idx) & 0xFFFF < self.drv.in_flight
                   and time.monotonic() < deadline):
                if select.select([engine.event_fd], [], [], 0.002)[0]:
                    engine.service()      # raises VirtqueueError once the queue broke
            engine.service()
            used = dict(self.drv.used())
        self.completed.update(used)
        if not self.drv.in_flight:
            self.alloc.reset()
        return used

    def fdatasyncs(self, monkeypatch):
        """A function returning how many fdatasync calls were made since: the
        model's (os.fdatasync, patched) plus the C engine's."""
        calls = []
        real = os.fdatasync
        monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append(fd), real(fd)))
        dev = self.dev

        def engine_syncs():
            return dev.engine.stats()["syncs"] if dev.engine is not None else 0
        base = engine_syncs()
        return lambda: len(calls) + engine_syncs() - base

    def status(self, req: Request) -> int:
        return self.mem.read(req.status_gpa, 1)[0]

    def data(self, req: Request) -> bytes:
        """What the device left in the request's IN buffers."""
        return b"".join(self.mem.read(g, n) for g, n in req.in_bufs)

    # -- one request at a time ------------------------------------------------------------
    def one(self, rtype, sector=0, out=b"", in_len=0, **kw) -> tuple[int, int, bytes]:
        """(status, used length, in data) of one request, run to completion."""
        req = self.submit(rtype, sector, out, in_len, **kw)
        used = self.run()
        assert list(used) == [req.head]
        return self.status(req), used[req.head], self.data(req)

    def read(self, sector: int, nbytes: int, **kw) -> tuple[int, bytes]:
        status, _, data = self.one(p.T_IN, sector, in_len=nbytes, **kw)
        return status, data

    def write(self, sector: int, data: bytes, **kw) -> int:
        return self.one(p.T_OUT, sector, out=data, **kw)[0]

    def flush(self) -> int:
        return self.one(p.T_FLUSH)[0]

    def get_id(self, length: int = p.ID_BYTES) -> tuple[int, bytes]:
        status, _, data = self.one(p.T_GET_ID, in_len=length)
        return status, data

    def discard_like(self, rtype: int, *segments: tuple[int, int, int]) -> int:
        payload = b"".join(p.SEGMENT.pack(*s) for s in segments)
        return self.one(rtype, out=payload)[0]


def write_image(path, size=1 << 20, fill=None) -> bytes:
    """A raw image of ``size`` bytes with a recognisable pattern; returns its contents."""
    if fill is None:                  # every 4-byte word holds its own index: no two alike
        fill = array.array("I", range(size // 4)).tobytes()
    path.write_bytes(fill)
    return fill


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    contents = write_image(path)
    return path, contents


@pytest.fixture(params=BACKENDS)
def queues(request):
    """The queue backend a test runs on: every device test runs on both."""
    return request.param


@pytest.fixture
def blk(image, queues):
    """(driver, device, image path, original contents) on a 1 MiB file."""
    path, contents = image
    dev = VirtioBlk(FileBackend(path), serial="test-serial")
    drv = BlkDriver(dev, queues=queues)
    yield drv, dev, path, contents
    dev.close()
    if drv.host:
        drv.host.close()


@pytest.fixture
def make_image():
    """write_image(path, size=1 MiB, fill=None) -> contents."""
    return write_image


@pytest.fixture
def driver(queues):
    """The BlkDriver class on the test's queue backend: driver(dev, event_idx=...,
    indirect=..., features=...)."""
    made = []

    def make(dev, **kw):
        drv = BlkDriver(dev, queues=kw.pop("queues", queues), **kw)
        made.append(drv)
        return drv

    yield make
    for drv in made:
        drv.dev.close()
        if drv.host:
            drv.host.close()


@pytest.fixture
def direct_dir(tmp_path):
    """A directory whose filesystem accepts O_DIRECT (tmp_path, else /var/tmp)."""
    found = _direct_io_dir(tmp_path)
    if found is None:
        pytest.skip("no filesystem here accepts O_DIRECT")
    if str(found) == str(tmp_path):
        yield tmp_path
        return
    d = tempfile.mkdtemp(prefix="kvmkit-blk-", dir=found)
    try:
        yield pathlib.Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _direct_io_dir(tmp_path):
    for d in (tmp_path, "/var/tmp"):
        probe = os.path.join(d, f".odirect-probe-{os.getpid()}")
        try:
            with open(probe, "wb") as f:
                f.write(bytes(4096))
            fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
            os.close(fd)
            return d
        except OSError:
            continue
        finally:
            try:
                os.unlink(probe)
            except OSError:
                pass
    return None
