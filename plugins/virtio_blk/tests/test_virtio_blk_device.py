"""The VirtioBlk model: configuration, features and every request type,
through the virtqueue driver model against a temporary image file."""
import errno
import os
import random
import struct

import pytest

from kvmkit.virtio.device import VIRTIO_F_VERSION_1
from kvmkit.virtio.queue import VirtqueueError
from kvmkit_virtio_blk import backend as backend_mod
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.backend import FileBackend
from kvmkit_virtio_blk.blk import (MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, QUEUE_SIZE,
                                   SIZE_MAX, VirtioBlk)

MiB = 1 << 20
SECTORS = MiB // 512


def bit(n):
    return 1 << n


def disk(path, **kw):
    readonly = kw.pop("readonly", False)
    return VirtioBlk(FileBackend(path, readonly=readonly), **kw)


# -- identity, configuration space, features ----------------------------------------------

def test_identity():
    assert (VirtioBlk.device_id, VirtioBlk.pci_class, tuple(VirtioBlk.queue_sizes)) == \
        (2, 0x018000, (256,))


def test_config_space_layout(image):
    path, _ = image
    dev = disk(path, serial="s")
    try:
        cfg = dev.config_bytes()
        assert len(cfg) == 72
        u8 = lambda off: cfg[off]
        u16 = lambda off: struct.unpack_from("<H", cfg, off)[0]
        u32 = lambda off: struct.unpack_from("<I", cfg, off)[0]
        assert struct.unpack_from("<Q", cfg, 0)[0] == SECTORS          # capacity
        assert u32(8) == SIZE_MAX == MiB                                 # size_max
        assert u32(12) == QUEUE_SIZE - 2 == 254                          # seg_max
        assert cfg[16:20] == bytes(4)                                    # geometry: not offered
        assert u32(20) == 512                                            # blk_size
        assert cfg[24:32] == bytes(8)                                    # topology: not offered
        assert u8(32) == 1 and u8(33) == 0                               # writeback, unused0
        assert u16(34) == 1                                              # num_queues
        assert u32(36) == MAX_DISCARD_SECTORS == 1 << 21                 # max_discard_sectors
        assert u32(40) == 1                                              # max_discard_seg
        assert u32(44) == os.stat(path).st_blksize // 512                # discard alignment
        assert u32(48) == MAX_WRITE_ZEROES_SECTORS == 1 << 16            # max_write_zeroes_sectors
        assert u32(52) == 1                                              # max_write_zeroes_seg
        assert u8(56) == 1 and cfg[57:60] == bytes(3)                    # may_unmap, unused1
        assert cfg[60:72] == bytes(12)                                   # secure erase: not offered
        assert dev.config_read(0, 8) == SECTORS
        assert dev.config_read(20, 4) == 512
        assert dev.config_read(70, 4) == 0                               # past the end reads 0
        dev.config_write(0, 8, 1)                                        # read-only: ignored
        assert dev.config_read(0, 8) == SECTORS
    finally:
        dev.close()


def test_features_read_write_with_discard(image):
    dev = disk(image[0])
    try:
        f = dev.features
        for b in (p.F_SIZE_MAX, p.F_SEG_MAX, p.F_BLK_SIZE, p.F_FLUSH, p.F_DISCARD,
                  p.F_WRITE_ZEROES):
            assert f & bit(b), b
        assert not f & bit(p.F_RO)
        assert not f & (bit(p.F_GEOMETRY) | bit(p.F_TOPOLOGY) | bit(p.F_CONFIG_WCE) | bit(p.F_MQ))
        assert f < bit(24)                       # device bits only; the transport adds its own
    finally:
        dev.close()


def test_features_without_discard(image):
    dev = disk(image[0], discard=False)
    try:
        assert not dev.features & (bit(p.F_DISCARD) | bit(p.F_WRITE_ZEROES))
        assert dev.features & bit(p.F_FLUSH)
        cfg = p.BlkConfig.unpack(dev.config_bytes())
        assert (cfg.max_discard_sectors, cfg.max_discard_seg, cfg.discard_sector_alignment,
                cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg,
                cfg.write_zeroes_may_unmap) == (0, 0, 0, 0, 0, 0)
    finally:
        dev.close()


def test_features_read_only(image):
    dev = disk(image[0], readonly=True)
    try:
        assert dev.features & bit(p.F_RO)
        # a read-only disk offers no way to change it
        assert not dev.features & (bit(p.F_DISCARD) | bit(p.F_WRITE_ZEROES))
    finally:
        dev.close()


# -- reads and writes ------------------------------------------------------------------------

def test_read_returns_file_contents(blk):
    d, dev, path, contents = blk
    status, data = d.read(3, 4096)
    assert status == p.S_OK
    assert data == contents[3 * 512:3 * 512 + 4096]


def test_read_used_length_counts_data_and_status(blk):
    d, *_ = blk
    assert d.one(p.T_IN, 0, in_len=1024)[1] == 1025
    assert d.one(p.T_OUT, 0, out=bytes(512))[1] == 1


def test_write_reaches_the_file_and_reads_back(blk):
    d, dev, path, contents = blk
    payload = os.urandom(8192)
    assert d.write(100, payload) == p.S_OK
    assert path.read_bytes()[100 * 512:100 * 512 + 8192] == payload
    assert d.read(100, 8192) == (p.S_OK, payload)
    # the rest of the file is untouched
    after = path.read_bytes()
    assert after[:100 * 512] == contents[:100 * 512]
    assert after[100 * 512 + 8192:] == contents[100 * 512 + 8192:]


@pytest.mark.parametrize("indirect", [False, True])
def test_scattered_buffers(blk, indirect):
    d, dev, path, contents = blk
    payload = os.urandom(2048)
    split = (100, 412, 1, 511, 1024)              # odd pieces; each request totals 2048
    assert d.write(7, payload, split=split, indirect=indirect) == p.S_OK
    assert path.read_bytes()[7 * 512:7 * 512 + 2048] == payload
    assert d.read(7, 2048, split=split, indirect=indirect) == (p.S_OK, payload)


def test_last_sector_and_zero_length(blk):
    d, dev, path, contents = blk
    assert d.read(SECTORS - 1, 512) == (p.S_OK, contents[-512:])
    assert d.write(SECTORS - 1, b"\x55" * 512) == p.S_OK
    assert path.read_bytes()[-512:] == b"\x55" * 512
    assert d.one(p.T_IN, SECTORS, in_len=0)[0] == p.S_OK          # empty request at the end


def test_many_requests_in_one_notification(blk):
    d, dev, path, contents = blk
    reqs = [d.submit(p.T_OUT, i * 8, out=bytes([i]) * 4096) for i in range(40)]
    reqs += [d.submit(p.T_IN, i * 8, in_len=4096) for i in range(40)]
    used = d.run()
    assert sorted(used) == sorted(r.head for r in reqs)
    assert all(d.status(r) == p.S_OK for r in reqs)
    for i, r in enumerate(reqs[40:]):
        assert d.data(r) == bytes([i]) * 4096


def test_event_idx_queue(image, driver):
    path, contents = image
    dev = disk(path)
    try:
        d = driver(dev, event_idx=True)
        assert d.read(0, 512) == (p.S_OK, contents[:512])
        assert d.drv.avail_event == d.drv.avail_idx   # the device asked for the next kick
        if d.host:                                    # the engine interrupted by itself
            assert d.host.interrupts() == 1
        else:
            assert d.queue.should_notify()
    finally:
        dev.close()


# -- flush, get-id -----------------------------------------------------------------------------

def test_flush_calls_fdatasync_on_the_image(blk, monkeypatch):
    d, dev, path, _ = blk
    syncs = d.fdatasyncs(monkeypatch)
    assert d.flush() == p.S_OK
    assert syncs() == 1


def test_flush_with_data_is_an_error(blk):
    d, *_ = blk
    assert d.one(p.T_FLUSH, 0, out=bytes(512))[0] == p.S_IOERR
    assert d.one(p.T_FLUSH, 0, in_len=512)[0] == p.S_IOERR


def test_get_id(image, driver):
    dev = disk(image[0], serial="disk-0")
    try:
        d = driver(dev)
        status, used, data = d.one(p.T_GET_ID, in_len=20)
        assert (status, used, data) == (p.S_OK, 21, b"disk-0" + bytes(14))
    finally:
        dev.close()


def test_get_id_of_exactly_20_bytes_has_no_nul(image, driver):
    dev = disk(image[0], serial="ABCDEFGHIJKLMNOPQRST")
    try:
        assert driver(dev).get_id() == (p.S_OK, b"ABCDEFGHIJKLMNOPQRST")
    finally:
        dev.close()


def test_get_id_buffer_too_small(blk):
    d, *_ = blk
    status, data = d.get_id(length=8)
    assert status == p.S_IOERR and data == bytes(8)


def test_serial_longer_than_20_bytes_is_refused(image):
    with pytest.raises(ValueError):
        VirtioBlk(FileBackend(image[0]), serial="x" * 21).close()


# -- discard and write-zeroes ------------------------------------------------------------------

def _punch_supported(directory):
    probe = directory / "punch-probe"
    probe.write_bytes(bytes(8192))
    fd = os.open(probe, os.O_RDWR)
    try:
        backend_mod.fallocate(fd, backend_mod.FALLOC_FL_PUNCH_HOLE | backend_mod.FALLOC_FL_KEEP_SIZE,
                              0, 4096)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        probe.unlink()


def test_discard_punches_a_hole(tmp_path, driver, make_image):
    if not _punch_supported(tmp_path):
        pytest.skip("this filesystem cannot punch holes")
    path = tmp_path / "sparse.img"
    contents = make_image(path, 4 * MiB)
    blocks_before = os.stat(path).st_blocks
    dev = disk(path)
    try:
        d = driver(dev)
        assert d.discard_like(p.T_DISCARD, (2048, 2048, 0)) == p.S_OK      # 1 MiB at 1 MiB
        assert os.stat(path).st_blocks < blocks_before
        data = path.read_bytes()
        assert data[:MiB] == contents[:MiB] and data[2 * MiB:] == contents[2 * MiB:]
        assert len(data) == 4 * MiB                                       # KEEP_SIZE
    finally:
        dev.close()


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes(blk, unmap):
    d, dev, path, contents = blk
    assert d.discard_like(p.T_WRITE_ZEROES, (10, 5, unmap)) == p.S_OK
    data = path.read_bytes()
    assert data[10 * 512:15 * 512] == bytes(5 * 512)
    assert data[:10 * 512] == contents[:10 * 512]
    assert data[15 * 512:] == contents[15 * 512:]
    assert d.read(10, 5 * 512) == (p.S_OK, bytes(5 * 512))


@pytest.mark.parametrize("unmap", [0, 1])
def test_write_zeroes_falls_back_to_writing_zeros(blk, monkeypatch, unmap):
    d, dev, path, contents = blk
    calls = []

    def unsupported(fd, mode, offset, length):
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(backend_mod, "fallocate", unsupported)
    assert d.discard_like(p.T_WRITE_ZEROES, (1, 3, unmap)) == p.S_OK
    assert path.read_bytes()[512:2048] == bytes(1536)
    assert path.read_bytes()[2048:4096] == contents[2048:4096]
    assert calls                                   # it tried fallocate first
    calls.clear()
    assert d.discard_like(p.T_WRITE_ZEROES, (9, 1, unmap)) == p.S_OK
    assert calls == []                             # and remembers it is unsupported
    assert path.read_bytes()[9 * 512:10 * 512] == bytes(512)


def test_discard_without_fallocate_is_a_successful_no_op(blk, monkeypatch):
    d, dev, path, contents = blk
    monkeypatch.setattr(backend_mod, "fallocate",
                        lambda *a: (_ for _ in ()).throw(OSError(errno.EOPNOTSUPP, "no")))
    assert d.discard_like(p.T_DISCARD, (0, 8, 0)) == p.S_OK
    assert path.read_bytes() == contents


@pytest.mark.parametrize("rtype", [p.T_DISCARD, p.T_WRITE_ZEROES])
def test_discard_and_write_zeroes_errors(blk, rtype):
    d, dev, path, contents = blk
    limit = MAX_DISCARD_SECTORS if rtype == p.T_DISCARD else MAX_WRITE_ZEROES_SECTORS
    assert d.discard_like(rtype, (0, 1, 2)) == p.S_UNSUPP                 # unknown flag
    assert d.discard_like(rtype, (0, 1, 0x8000_0000)) == p.S_UNSUPP
    assert d.discard_like(rtype, (0, 1, 0), (8, 1, 0)) == p.S_IOERR       # two segments
    assert d.discard_like(rtype, (SECTORS - 1, 2, 0)) == p.S_IOERR        # past the end
    assert d.discard_like(rtype, ((1 << 64) - 1, 1, 0)) == p.S_IOERR
    assert d.discard_like(rtype, (0, limit + 1, 0)) == p.S_IOERR          # over the maximum
    assert d.one(rtype, out=b"\0" * 15)[0] == p.S_IOERR                   # not a whole segment
    assert d.one(rtype, out=b"")[0] == p.S_IOERR                          # no segment
    assert d.one(rtype, out=bytes(16), in_len=512)[0] == p.S_IOERR        # data the wrong way
    assert d.discard_like(rtype, (0, 0, 0)) == p.S_OK                     # empty range
    assert path.read_bytes() == contents


def test_discard_with_unmap_flag_is_unsupported(blk):
    d, dev, path, contents = blk
    assert d.discard_like(p.T_DISCARD, (0, 8, 1)) == p.S_UNSUPP           # 5.2.6.2
    assert path.read_bytes() == contents


def test_discard_off_or_not_negotiated(image, driver):
    path, contents = image
    dev = disk(path, discard=False)
    try:
        d = driver(dev)
        assert d.discard_like(p.T_DISCARD, (0, 8, 0)) == p.S_UNSUPP
        assert d.discard_like(p.T_WRITE_ZEROES, (0, 8, 0)) == p.S_UNSUPP
    finally:
        dev.close()
    dev = disk(path)
    try:
        d = driver(dev, features=bit(VIRTIO_F_VERSION_1) | bit(p.F_FLUSH))
        assert d.discard_like(p.T_DISCARD, (0, 8, 0)) == p.S_UNSUPP
        assert d.discard_like(p.T_WRITE_ZEROES, (0, 8, 0)) == p.S_UNSUPP
    finally:
        dev.close()
    assert path.read_bytes() == contents


@pytest.mark.parametrize("rtype", [p.T_GET_LIFETIME, p.T_SECURE_ERASE, 2, 5, 99, 0xFFFF_FFFF])
def test_unknown_request_types_are_unsupported(blk, rtype):
    d, dev, path, contents = blk
    status, used, _ = d.one(rtype, 0, out=bytes(512))
    assert (status, used) == (p.S_UNSUPP, 1)
    assert path.read_bytes() == contents


# -- read-only disks -------------------------------------------------------------------------

def test_read_only_disk_refuses_every_write(image, driver):
    path, contents = image
    dev = disk(path, readonly=True)
    try:
        d = driver(dev, features=dev.features | bit(p.F_DISCARD) | bit(p.F_WRITE_ZEROES))
        assert d.write(0, bytes(512)) == p.S_IOERR
        assert d.discard_like(p.T_DISCARD, (0, 8, 0)) == p.S_IOERR
        assert d.discard_like(p.T_WRITE_ZEROES, (0, 8, 0)) == p.S_IOERR
        assert d.read(0, 512) == (p.S_OK, contents[:512])
        assert d.flush() == p.S_OK
    finally:
        dev.close()
    assert path.read_bytes() == contents


@pytest.mark.skipif(os.geteuid() == 0, reason="root opens read-only files for writing")
def test_unwritable_file_becomes_a_read_only_disk(image, driver):
    path, contents = image
    path.chmod(0o444)
    dev = disk(path)
    try:
        assert dev.backend.forced_readonly and dev.readonly
        assert dev.features & bit(p.F_RO)
        assert driver(dev).write(0, bytes(512)) == p.S_IOERR
    finally:
        dev.close()
    assert path.read_bytes() == contents


# -- hostile and malformed requests ----------------------------------------------------------

@pytest.mark.parametrize("case", [
    "read_past_end", "read_straddles_end", "read_huge_sector", "write_past_end",
    "write_straddles_end", "write_huge_sector", "read_not_sector_multiple",
    "write_not_sector_multiple", "header_too_short", "header_only_status",
    "read_with_readable_data", "write_with_writable_data", "status_in_readable_only",
])
def test_malformed_requests_fail_with_ioerr(blk, case):
    d, dev, path, contents = blk
    status, used = None, None
    if case == "read_past_end":
        status, used, _ = d.one(p.T_IN, SECTORS, in_len=512)
    elif case == "read_straddles_end":
        status, used, _ = d.one(p.T_IN, SECTORS - 1, in_len=1024)
    elif case == "read_huge_sector":
        status, used, _ = d.one(p.T_IN, (1 << 64) - 1, in_len=512)
    elif case == "write_past_end":
        status, used, _ = d.one(p.T_OUT, SECTORS, out=bytes(512))
    elif case == "write_straddles_end":
        status, used, _ = d.one(p.T_OUT, SECTORS - 1, out=bytes(1024))
    elif case == "write_huge_sector":
        status, used, _ = d.one(p.T_OUT, (1 << 55), out=bytes(512))
    elif case == "read_not_sector_multiple":
        status, used, _ = d.one(p.T_IN, 0, in_len=100)
    elif case == "write_not_sector_multiple":
        status, used, _ = d.one(p.T_OUT, 0, out=bytes(513))
    elif case == "header_too_short":
        status, used, _ = d.one(p.T_IN, 0, in_len=512, header=b"\0" * 8)
    elif case == "header_only_status":
        status, used, _ = d.one(p.T_IN, 0, header=b"")
    elif case == "read_with_readable_data":
        status, used, _ = d.one(p.T_IN, 0, out=bytes(512), in_len=512)
    elif case == "write_with_writable_data":
        status, used, _ = d.one(p.T_OUT, 0, out=bytes(512), in_len=512)
    elif case == "status_in_readable_only":
        # no writable buffer at all: nowhere to put a status; completed with 0 bytes
        req = d.submit(p.T_OUT, 0, out=bytes(512), status_len=0)
        before = bytes(d.mem.view(0, d.mem.size))
        assert d.run() == {req.head: 0}
        after = bytes(d.mem.view(0, d.mem.size))
        ring, n = d.drv.used_ring, 6 + 8 * QUEUE_SIZE
        assert before[:ring] == after[:ring] and before[ring + n:] == after[ring + n:]
        assert path.read_bytes() == contents
        return
    assert (status, used) == (p.S_IOERR, 1)
    assert path.read_bytes() == contents


def test_host_io_error_is_ioerr(blk):
    d, dev, path, contents = blk
    os.truncate(path, 512 * 1024)                 # the image shrinks under the VM
    status, data = d.read(2000, 512)              # within capacity, past the new end
    assert status == p.S_IOERR
    assert d.read(0, 512)[0] == p.S_OK


def test_broken_ring_raises_from_process_after_serving_earlier_requests(blk):
    d, dev, path, contents = blk
    good = d.submit(p.T_IN, 0, in_len=512)
    d.drv.write_desc(200, 1 << 40, 16)            # a descriptor outside guest RAM
    d.drv.submit_head(200)
    with pytest.raises(VirtqueueError):
        d.run()
    assert dict(d.drv.used()) == {good.head: 513}
    assert d.status(good) == p.S_OK


def test_process_of_a_queue_not_set_up_is_ignored(blk):
    d, dev, *_ = blk
    dev.process(5)
    dev.queues[0] = None
    dev.process(0)


def test_reset_drops_the_queues(blk):
    d, dev, *_ = blk
    dev.reset()
    assert dev.queues == [] and dev.driver_features == 0
    dev.process(0)                                # nothing to do, no error


def test_random_requests_never_raise(blk):
    """Random headers, lengths and layouts: every request completes with a status."""
    d, dev, path, contents = blk
    rng = random.Random(1234)
    types = [p.T_IN, p.T_OUT, p.T_FLUSH, p.T_GET_ID, p.T_DISCARD, p.T_WRITE_ZEROES, 3, 77]
    for _ in range(400):
        rtype = rng.choice(types + [rng.getrandbits(32)])
        sector = rng.choice([0, 1, SECTORS - 1, SECTORS, rng.getrandbits(64), rng.randrange(SECTORS)])
        out_len = rng.choice([0, 0, 16, 32, 512, rng.randrange(0, 2048)])
        in_len = rng.choice([0, 0, 20, 512, rng.randrange(0, 2048)])
        header_len = rng.choice([16, 16, 16, 0, 4, 24])
        out = bytes(rng.getrandbits(8) for _ in range(out_len))
        header = (p.HEADER.pack(rtype, 0, sector) + bytes(8))[:header_len]
        status_len = rng.choice([1, 1, 1, 0, 3])
        if not (header or out or in_len or status_len):
            continue                              # a chain needs at least one buffer
        req = d.submit(rtype, sector, out, in_len, header=header, status_len=status_len,
                       indirect=rng.random() < 0.3)
        used = d.run()
        if req.status_gpa is None:
            # the status lands in the last data byte, if there is a writable one
            assert used[req.head] in ({1, in_len} if in_len else {0})
        else:
            assert d.status(req) in (p.S_OK, p.S_IOERR, p.S_UNSUPP)
            assert 1 <= used[req.head] <= in_len + status_len


def test_write_through_when_flush_is_not_negotiated(image, driver, monkeypatch):
    """5.2.6.2: FLUSH offered but not negotiated means completed writes are stable."""
    path, _ = image
    dev = disk(path)
    try:
        d = driver(dev, features=bit(VIRTIO_F_VERSION_1) | bit(p.F_WRITE_ZEROES))
        syncs = d.fdatasyncs(monkeypatch)
        assert d.write(0, bytes(512)) == p.S_OK
        assert syncs() == 1
        assert d.discard_like(p.T_WRITE_ZEROES, (0, 1, 0)) == p.S_OK
        assert syncs() == 2
        dev.reset()
        d2 = driver(dev)                          # renegotiated with FLUSH
        syncs = d2.fdatasyncs(monkeypatch)
        assert d2.write(0, bytes(512)) == p.S_OK
        assert syncs() == 0
    finally:
        dev.close()
