"""The image backend: opening, locking, sizes, O_DIRECT bounce buffering."""
import ctypes
import mmap
import os

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit_virtio_blk import backend as backend_mod
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.backend import FileBackend
from kvmkit_virtio_blk.blk import VirtioBlk

MiB = 1 << 20


def test_missing_file(tmp_path):
    path = tmp_path / "nope.img"
    with pytest.raises(DeviceError, match=f"{path}.*does not exist"):
        FileBackend(path)


def test_directory(tmp_path):
    with pytest.raises(DeviceError, match=f"{tmp_path}.*is a directory"):
        FileBackend(tmp_path)
    with pytest.raises(DeviceError, match=f"{tmp_path}.*is a directory"):
        FileBackend(tmp_path, readonly=True)


@pytest.mark.parametrize("size", [1, 511, 513, MiB + 100])
def test_size_not_a_multiple_of_512(tmp_path, size):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(size))
    with pytest.raises(DeviceError, match=f"{path} is {size} bytes, not a multiple of 512"):
        FileBackend(path)


def test_character_device_is_refused():
    with pytest.raises(DeviceError, match="neither a regular file nor a block device"):
        FileBackend("/dev/null", readonly=True)


def test_size_and_block_size(image):
    b = FileBackend(image[0])
    try:
        assert b.size() == MiB and b.block_size == 512 and not b.readonly
        assert b.discard_granularity >= 512
    finally:
        b.close()


def test_empty_image_is_allowed(tmp_path):
    path = tmp_path / "empty.img"
    path.write_bytes(b"")
    b = FileBackend(path)
    try:
        dev = VirtioBlk(b)
        assert dev.capacity == 0
    finally:
        b.close()


# -- locking ------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_ro,second_ro", [(False, False), (False, True), (True, False)])
def test_second_open_is_refused_while_locked(image, first_ro, second_ro):
    path = image[0]
    first = FileBackend(path, readonly=first_ro)
    try:
        with pytest.raises(DeviceError, match=f"{path} is in use by another VM \\(locked\\)"):
            FileBackend(path, readonly=second_ro)
    finally:
        first.close()
    FileBackend(path, readonly=second_ro).close()        # released on close


def test_read_only_opens_share_the_image(image):
    a = FileBackend(image[0], readonly=True)
    b = FileBackend(image[0], readonly=True)
    a.close()
    b.close()


def test_failed_setup_leaves_no_lock_behind(tmp_path):
    path = tmp_path / "odd.img"
    path.write_bytes(bytes(700))
    with pytest.raises(DeviceError):
        FileBackend(path)
    path.write_bytes(bytes(1024))
    FileBackend(path).close()


def test_close_is_idempotent(image):
    b = FileBackend(image[0])
    b.close()
    b.close()


# -- whole transfers ------------------------------------------------------------------------

def test_short_transfers_are_continued(image, monkeypatch):
    """preadv/pwritev may move fewer bytes than asked; the backend goes on."""
    path, contents = image
    b = FileBackend(path)
    real_preadv, real_pwritev = os.preadv, os.pwritev

    def dribble(real):
        def call(fd, bufs, offset):
            first = memoryview(bufs[0])
            return real(fd, [first[:min(len(first), 100)]], offset)
        return call

    try:
        monkeypatch.setattr(os, "preadv", dribble(real_preadv))
        monkeypatch.setattr(os, "pwritev", dribble(real_pwritev))
        out = bytearray(3000)
        b.pread([memoryview(out)[:1000], memoryview(out)[1000:]], 512)
        assert bytes(out) == contents[512:3512]
        b.pwrite([memoryview(b"A" * 700), memoryview(b"B" * 324)], 0)
    finally:
        b.close()
    assert path.read_bytes()[:1024] == b"A" * 700 + b"B" * 324


def test_read_past_the_end_of_a_shrunk_file_is_an_error(image):
    path, _ = image
    b = FileBackend(path)
    try:
        os.truncate(path, 4096)
        with pytest.raises(OSError):
            b.pread([memoryview(bytearray(512))], 8192)
    finally:
        b.close()


def test_read_only_backend_refuses_writes(image):
    b = FileBackend(image[0], readonly=True)
    try:
        for call in (lambda: b.pwrite([memoryview(bytes(512))], 0), lambda: b.discard(0, 512),
                     lambda: b.write_zeroes(0, 512, False)):
            with pytest.raises(OSError):
                call()
    finally:
        b.close()


# -- O_DIRECT ---------------------------------------------------------------------------------

def _unaligned(buf: bytearray, shift: int, n: int) -> memoryview:
    """A view of ``n`` bytes whose host address is ``shift`` past a 512 boundary."""
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    start = (-base) % 512 + shift
    return memoryview(buf)[start:start + n]


def test_direct_aligned_and_unaligned_buffers(direct_dir, make_image, monkeypatch):
    path = direct_dir / "direct.img"
    contents = make_image(path, 2 * MiB)
    b = FileBackend(path, direct=True)
    bounced = []
    real = FileBackend._bounced
    monkeypatch.setattr(FileBackend, "_bounced",
                        lambda self, bufs, off, write: (bounced.append(write),
                                                        real(self, bufs, off, write=write)))
    try:
        assert b.direct and b.block_size in (512, 4096)
        aligned = mmap.mmap(-1, 8192)
        b.pread([memoryview(aligned)[:4096]], 4096)              # the direct path
        assert aligned[:4096] == contents[4096:8192] and bounced == []
        raw = bytearray(3 * 8192)
        view = _unaligned(raw, 3, 8192)                          # odd address: bounced
        b.pread([view], 8192)
        assert bytes(view) == contents[8192:16384] and bounced == [False]
        payload = os.urandom(8192)
        view[:] = payload
        b.pwrite([view[:100], view[100:5000], view[5000:]], 65536)   # odd lengths: bounced
        assert bounced == [False, True]
        b.flush()
    finally:
        b.close()
    data = path.read_bytes()
    assert data[65536:65536 + 8192] == payload
    assert data[:65536] == contents[:65536] and data[65536 + 8192:] == contents[65536 + 8192:]


def test_direct_read_modify_write_of_partial_blocks(direct_dir, make_image, monkeypatch):
    """With a 4 KiB direct-I/O block, a 512-byte write inside a block is done by
    reading the block, patching it and writing it back; neighbours survive.  A
    small bounce buffer makes the request span several chunks."""
    path = direct_dir / "rmw.img"
    contents = make_image(path, MiB)
    b = FileBackend(path, direct=True)
    try:
        b.block_size = 4096
        monkeypatch.setattr(backend_mod, "BOUNCE_SIZE", 8192)
        payload = os.urandom(512 * 37)
        b.pwrite([memoryview(payload)], 512 * 3)                 # starts and ends mid-block
        out = bytearray(512 * 37)
        b.pread([memoryview(out)], 512 * 3)
        assert bytes(out) == payload
        b.write_zeroes(512 * 50, 512, unmap=False)
    finally:
        b.close()
    data = path.read_bytes()
    expect = bytearray(contents)
    expect[1536:1536 + len(payload)] = payload
    expect[512 * 50:512 * 51] = bytes(512)
    assert data == bytes(expect)


def test_direct_device_with_unaligned_guest_buffers(direct_dir, make_image, driver):
    path = direct_dir / "guest.img"
    contents = make_image(path, MiB)
    dev = VirtioBlk(FileBackend(path, direct=True))
    try:
        d = driver(dev)
        payload = os.urandom(4096)
        assert d.write(16, payload, misalign=7) == p.S_OK
        assert d.write(40, payload, split=(100, 3000), misalign=1) == p.S_OK
        assert d.read(16, 4096, misalign=3) == (p.S_OK, payload)
        assert d.read(40, 4096) == (p.S_OK, payload)
        assert d.flush() == p.S_OK
    finally:
        dev.close()
    data = path.read_bytes()
    assert data[16 * 512:16 * 512 + 4096] == payload == data[40 * 512:40 * 512 + 4096]
    assert data[:16 * 512] == contents[:16 * 512]


def test_direct_on_a_filesystem_without_o_direct(tmp_path, monkeypatch):
    path = tmp_path / "x.img"
    path.write_bytes(bytes(4096))
    real_open = os.open

    def no_direct(p_, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        return real_open(p_, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(DeviceError, match="does not support cache = \"none\""):
        FileBackend(path, direct=True)
