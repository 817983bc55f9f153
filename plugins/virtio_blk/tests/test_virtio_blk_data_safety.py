"""Data safety: what the guest is told is done must be done.

:class:`PowerLossBackend` keeps written-but-unsynced data apart from the
durable image; ``crash()`` throws the unsynced part away, as a host power
failure would.  Its hooks look at the used ring while a write or a flush is
still inside the backend, to prove the device has not acknowledged it yet.
"""
import errno
import random

import pytest

from kvmkit.virtio.device import VIRTIO_F_VERSION_1
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.blk import VirtioBlk

SECTORS = 256
SIZE = SECTORS * 512


class PowerLossBackend:
    """An in-memory disk with a volatile write cache."""

    readonly = False
    block_size = 512
    discard_granularity = 4096

    def __init__(self, size: int = SIZE):
        self.durable = bytearray(size)
        self.pending: list[tuple[int, bytes]] = []     # unsynced writes, in order
        self.log: list[tuple] = []                     # ("pwrite", offset, len) / ("flush",) ...
        self.on_pwrite = None                          # hooks: called inside the operation
        self.on_flush = None
        self.fail_flush = False
        self.closed = False

    def size(self) -> int:
        return len(self.durable)

    def _current(self) -> bytearray:
        image = bytearray(self.durable)
        for offset, data in self.pending:
            image[offset:offset + len(data)] = data
        return image

    def pread(self, bufs, offset):
        image = self._current()
        for b in bufs:
            b[:] = image[offset:offset + len(b)]
            offset += len(b)
        self.log.append(("pread", offset))

    def pwrite(self, bufs, offset):
        data = b"".join(bytes(b) for b in bufs)
        if self.on_pwrite:
            self.on_pwrite(offset, data)
        self.pending.append((offset, data))
        self.log.append(("pwrite", offset, len(data)))

    def flush(self):
        if self.on_flush:
            self.on_flush()
        if self.fail_flush:
            raise OSError(errno.EIO, "fdatasync failed")
        self.durable = self._current()
        self.pending.clear()
        self.log.append(("flush",))

    def discard(self, offset, length):
        self.pending.append((offset, bytes(length)))

    def write_zeroes(self, offset, length, unmap):
        self.pending.append((offset, bytes(length)))

    def crash(self):
        """Power loss: everything not flushed is gone."""
        self.pending.clear()

    def close(self):
        self.closed = True


@pytest.fixture
def rig(driver):
    backend = PowerLossBackend()
    dev = VirtioBlk(backend, serial="crash")
    return driver(dev), dev, backend


def sector_data(tag: int) -> bytes:
    return bytes([tag & 0xFF]) * 512


def test_no_write_is_acknowledged_before_its_pwrite_returned(rig):
    d, dev, backend = rig
    seen = []

    def check(offset, data):
        # inside pwrite of request k: exactly the k earlier requests are in the used ring
        seen.append(d.drv.used_idx)

    backend.on_pwrite = check
    reqs = [d.submit(p.T_OUT, i, out=sector_data(i)) for i in range(8)]
    used = d.run()
    assert seen == list(range(8))
    assert set(used) == {r.head for r in reqs}
    assert all(d.status(r) == p.S_OK for r in reqs)


def test_flush_is_acknowledged_only_after_fdatasync_returned(rig):
    d, dev, backend = rig
    w = d.submit(p.T_OUT, 3, out=sector_data(3))
    f = d.submit(p.T_FLUSH)
    inside = []

    def check():
        # the write before it is complete, the flush itself is not
        inside.append((d.drv.used_idx, d.mem.read(f.status_gpa, 1)))

    backend.on_flush = check
    used = d.run()
    assert inside == [(1, b"\xee")]                  # status not written yet either
    assert list(used) == [w.head, f.head]
    assert d.status(f) == p.S_OK


def test_acknowledged_writes_before_a_completed_flush_survive_a_crash(rig):
    d, dev, backend = rig
    for i in range(4):
        assert d.write(i, sector_data(10 + i)) == p.S_OK
    assert d.flush() == p.S_OK
    assert d.write(1, sector_data(99)) == p.S_OK     # acknowledged, but never flushed
    assert d.write(7, sector_data(98)) == p.S_OK
    backend.crash()
    for i in range(4):
        assert backend.durable[i * 512:(i + 1) * 512] == sector_data(10 + i)
    # the simulation is real: the unflushed writes are gone
    assert backend.durable[7 * 512:8 * 512] == bytes(512)
    assert d.read(1, 512) == (p.S_OK, sector_data(11))


def test_a_failed_flush_is_reported_and_claims_nothing(rig):
    d, dev, backend = rig
    assert d.write(0, sector_data(5)) == p.S_OK
    backend.fail_flush = True
    assert d.flush() == p.S_IOERR
    backend.crash()
    assert backend.durable[:512] == bytes(512)


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_of_writes_and_flushes_then_crash(rig, seed):
    """Random batches (several requests per notification); after the crash the
    disk holds, for every sector, what the guest had written to it as of its
    last completed flush."""
    d, dev, backend = rig
    rng = random.Random(seed)
    acknowledged = bytearray(SIZE)          # the disk as the guest's completed writes left it
    at_last_flush = bytearray(SIZE)
    tag = 0
    for _ in range(30):
        batch = []
        for _ in range(rng.randrange(1, 6)):
            if rng.random() < 0.2:
                batch.append(("flush", d.submit(p.T_FLUSH)))
            else:
                tag += 1
                sector = rng.randrange(SECTORS - 4)
                n = rng.randrange(1, 4)
                data = bytes([tag & 0xFF]) * (512 * n)
                batch.append(("write", d.submit(p.T_OUT, sector, out=data), sector, data))
        used = d.run()
        # the device serves a batch in order: apply completions in used-ring order
        by_head = {entry[1].head: entry for entry in batch}
        for head in used:
            kind, req, *rest = by_head[head]
            assert d.status(req) == p.S_OK
            if kind == "write":
                sector, data = rest
                acknowledged[sector * 512:sector * 512 + len(data)] = data
            else:
                at_last_flush[:] = acknowledged
    backend.crash()
    assert backend.durable == at_last_flush


def test_without_negotiated_flush_every_acknowledged_write_is_durable(driver):
    backend = PowerLossBackend()
    dev = VirtioBlk(backend)
    d = driver(dev, features=1 << VIRTIO_F_VERSION_1)
    for i in range(5):
        assert d.write(i, sector_data(i + 1)) == p.S_OK
    assert d.discard_like(p.T_WRITE_ZEROES, (2, 1, 0)) == p.S_UNSUPP   # not negotiated
    backend.crash()
    for i in range(5):
        assert backend.durable[i * 512:(i + 1) * 512] == sector_data(i + 1)
    assert [e[0] for e in backend.log] == ["pwrite", "flush"] * 5


def test_close_closes_the_backend(rig):
    d, dev, backend = rig
    dev.close()
    assert backend.closed
