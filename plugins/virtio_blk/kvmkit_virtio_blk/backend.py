"""Disk images: the backend interface the device model uses, and the file /
block-device implementation.

Every method transfers all of its bytes or raises :class:`OSError`; the model
turns an OSError into VIRTIO_BLK_S_IOERR.  Tests substitute their own backend
(for instance one that simulates power loss).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
from pathlib import Path
from typing import Protocol, Sequence

from kvmkit.plugin_api import DeviceError

__all__ = ["BlockBackend", "FileBackend", "open_image"]

SECTOR = 512
BLKGETSIZE64 = 0x80081272           # _IOR(0x12, 114, size_t)
IOV_MAX = os.sysconf("SC_IOV_MAX")   # iovecs one preadv/pwritev takes
BOUNCE_SIZE = 1 << 20               # O_DIRECT bounce buffer (and zero-fill chunk)
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.ENOTTY)


class BlockBackend(Protocol):
    """What the virtio-blk model needs from an image."""

    readonly: bool
    block_size: int          # the smallest efficient (for O_DIRECT: required) I/O unit
    discard_granularity: int  # bytes; the unit in which discards free space

    def size(self) -> int:
        """The image size in bytes (a multiple of 512)."""

    def pread(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Fill ``bufs`` (in order) from ``offset``."""

    def pwrite(self, bufs: Sequence[memoryview], offset: int) -> None:
        """Write ``bufs`` (in order) at ``offset``; returns once the host accepted them."""

    def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""

    def discard(self, offset: int, length: int) -> None:
        """Let the range's storage go; later reads may return anything."""

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        """Zero the range (deallocating it where ``unmap`` and possible)."""

    def close(self) -> None: ...


# -- fallocate(2) (os has only posix_fallocate, which takes no mode) -------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_fallocate_fn = getattr(_libc, "fallocate64", None) or getattr(_libc, "fallocate", None)
if _fallocate_fn is not None:
    _fallocate_fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _fallocate_fn.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _fallocate_fn is None:
        raise OSError(errno.ENOSYS, "fallocate is not available")
    if _fallocate_fn(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# -- helpers ------------------------------------------------------------------------------

def _address(view: memoryview) -> int | None:
    """The host address of a buffer, or None for a read-only one (bytes)."""
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):
        return None


def _consume(bufs: list[memoryview], n: int) -> list[memoryview]:
    """``bufs`` without their first ``n`` bytes."""
    while n and bufs:
        if n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs = bufs[1:]
        else:
            bufs = [bufs[0][n:]] + bufs[1:]
            n = 0
    return bufs


def _locate(bufs: Sequence[memoryview], pos: int, n: int):
    """(view, start, count) pieces of ``n`` bytes at ``pos`` of the buffers' concatenation."""
    for view in bufs:
        if n == 0:
            return
        if pos >= len(view):
            pos -= len(view)
            continue
        take = min(len(view) - pos, n)
        yield view, pos, take
        n -= take
        pos = 0


def _gather(bufs: Sequence[memoryview], pos: int, out: memoryview) -> None:
    """Copy ``len(out)`` bytes from ``pos`` of the buffers into ``out``."""
    done = 0
    for view, start, take in _locate(bufs, pos, len(out)):
        out[done:done + take] = view[start:start + take]
        done += take


def _scatter(bufs: Sequence[memoryview], pos: int, data: memoryview) -> None:
    """Copy ``data`` into the buffers from ``pos``."""
    done = 0
    for view, start, take in _locate(bufs, pos, len(data)):
        view[start:start + take] = data[done:done + take]
        done += take


class FileBackend:
    """A raw image in a regular file or a block device, held open and locked
    (flock: exclusive when writable, shared when read-only) until close().

    With ``direct`` the file is opened O_DIRECT (host page cache bypassed);
    requests whose buffers or offsets are not aligned go through an aligned
    bounce buffer.
    """

    def __init__(self, path: Path | str, *, readonly: bool = False, direct: bool = False):
        self.path = Path(path)
        self.direct = direct
        self.forced_readonly = False
        self._fd = -1
        self._bounce: mmap.mmap | None = None
        self._zeros: mmap.mmap | None = None
        self._can_punch = True
        self._can_zero_range = True
        self.readonly = readonly
        self._fd = self._open()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------
    def _open(self) -> int:
        flags = os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)
        try:
            if not self.readonly:
                try:
                    return os.open(self.path, flags | os.O_RDWR)
                except OSError as e:
                    if e.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                        raise
                    self.readonly = self.forced_readonly = True
            return os.open(self.path, flags | os.O_RDONLY)
        except FileNotFoundError:
            raise DeviceError(f"disk image {self.path} does not exist") from None
        except IsADirectoryError:
            raise DeviceError(f"disk image {self.path} is a directory") from None
        except OSError as e:
            if self.direct and e.errno == errno.EINVAL:
                raise DeviceError(f"disk image {self.path}: its filesystem does not support "
                                  "cache = \"none\" (O_DIRECT); use cache = \"writeback\"") from None
            raise DeviceError(f"cannot open disk image {self.path}: {e.strerror}") from None

    def _setup(self) -> None:
        st = os.fstat(self._fd)
        if stat.S_ISDIR(st.st_mode):
            raise DeviceError(f"disk image {self.path} is a directory")
        if stat.S_ISREG(st.st_mode):
            self.is_block_device = False
            self._size = st.st_size
        elif stat.S_ISBLK(st.st_mode):
            self.is_block_device = True
            self._size = self._block_device_size()
        else:
            raise DeviceError(f"disk image {self.path} is neither a regular file nor a block device")
        if self._size % SECTOR:
            raise DeviceError(f"disk image {self.path} is {self._size} bytes, not a multiple of "
                              f"{SECTOR}")
        try:
            fcntl.flock(self._fd, (fcntl.LOCK_SH if self.readonly else fcntl.LOCK_EX)
                        | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DeviceError(f"disk image {self.path} is in use by another VM (locked)") from None
        self.discard_granularity = max(SECTOR, st.st_blksize or SECTOR)
        self.block_size = SECTOR
        if self.direct:
            self._bounce = mmap.mmap(-1, BOUNCE_SIZE)
            self.block_size = self._direct_alignment()
            if self._size % self.block_size:
                raise DeviceError(f"disk image {self.path} is {self._size} bytes; with cache = "
                                  f"\"none\" it must be a multiple of {self.block_size} (the "
                                  "host's direct-I/O block size)")

    def _block_device_size(self) -> int:
        buf = bytearray(8)
        try:
            fcntl.ioctl(self._fd, BLKGETSIZE64, buf)
            return int.from_bytes(buf, "little")
        except OSError:
            return os.lseek(self._fd, 0, os.SEEK_END)

    def _direct_alignment(self) -> int:
        """The smallest of 512 and 4096 that O_DIRECT accepts here."""
        if self._size == 0:
            return SECTOR
        view = memoryview(self._bounce)
        for align in (SECTOR, 4096):
            try:
                os.preadv(self._fd, [view[:align]], 0)
                return align
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise DeviceError(f"cannot read disk image {self.path}: {e.strerror}") from None
        raise DeviceError(f"disk image {self.path}: direct I/O fails at 4 KiB alignment; "
                          "use cache = \"writeback\"")

    # -- the BlockBackend interface --------------------------------------------------------
    def size(self) -> int:
        return self._size

    def pread(self, bufs: Sequence[memoryview], offset: int) -> None:
        if self.direct and not self._aligned(bufs, offset):
            self._bounced(bufs, offset, write=False)
        else:
            self._transfer(os.preadv, list(bufs), offset)

    def pwrite(self, bufs: Sequence[memoryview], offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "the disk is read-only")
        if self.direct and not self._aligned(bufs, offset):
            self._bounced(bufs, offset, write=True)
        else:
            self._transfer(os.pwritev, list(bufs), offset)

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def discard(self, offset: int, length: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "the disk is read-only")
        if not self._can_punch or length == 0:
            return                   # discard is a hint: doing nothing is a valid answer
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            if e.errno not in _UNSUPPORTED:
                raise
            self._can_punch = False

    def write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "the disk is read-only")
        if length == 0:
            return
        modes = []
        if unmap and self._can_punch:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        if self._can_zero_range:
            modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self._fd, mode, offset, length)
                return
            except OSError as e:
                if e.errno not in _UNSUPPORTED:
                    raise
                if mode & FALLOC_FL_PUNCH_HOLE:
                    self._can_punch = False
                else:
                    self._can_zero_range = False
        self._write_zero_bytes(offset, length)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)        # releases the flock too
            self._fd = -1
        for m in (self._bounce, self._zeros):
            if m is not None:
                m.close()
        self._bounce = self._zeros = None

    @property
    def fileno(self) -> int:
        return self._fd

    # -- internals ----------------------------------------------------------------------------
    def _transfer(self, call, bufs: list[memoryview], offset: int) -> None:
        """preadv/pwritev until every byte moved (they may transfer less)."""
        remaining = sum(len(b) for b in bufs)
        while remaining:
            n = call(self._fd, bufs if len(bufs) <= IOV_MAX else bufs[:IOV_MAX], offset)
            if n == 0:
                raise OSError(errno.EIO, f"{self.path}: short transfer at offset {offset} "
                                         "(image shrunk?)")
            remaining -= n
            offset += n
            bufs = _consume(bufs, n)

    def _aligned(self, bufs: Sequence[memoryview], offset: int) -> bool:
        a = self.block_size
        if offset % a:
            return False
        for b in bufs:
            if len(b) % a:
                return False
            addr = _address(b)
            if addr is None or addr % a:
                return False
        return True

    def _bounced(self, bufs: Sequence[memoryview], offset: int, *, write: bool) -> None:
        """Move the request through the aligned bounce buffer in chunks; partial
        blocks at either end of a write are read first (read-modify-write)."""
        a = self.block_size
        length = sum(len(b) for b in bufs)
        start = offset // a * a
        end = -(-(offset + length) // a) * a
        bounce = memoryview(self._bounce)
        pos = start
        while pos < end:
            chunk = min(BOUNCE_SIZE, end - pos)
            window = bounce[:chunk]
            lo = max(offset, pos)                      # requested bytes inside this chunk
            hi = min(offset + length, pos + chunk)
            if write:
                if lo > pos or hi < pos + chunk:
                    self._transfer(os.preadv, [window], pos)
                _gather(bufs, lo - offset, window[lo - pos:hi - pos])
                self._transfer(os.pwritev, [window], pos)
            else:
                self._transfer(os.preadv, [window], pos)
                _scatter(bufs, lo - offset, window[lo - pos:hi - pos])
            pos += chunk

    def _write_zero_bytes(self, offset: int, length: int) -> None:
        if self._zeros is None:
            self._zeros = mmap.mmap(-1, BOUNCE_SIZE)   # anonymous pages read as zero
        zeros = memoryview(self._zeros)
        while length:
            n = min(length, BOUNCE_SIZE)
            self.pwrite([zeros[:n]], offset)
            offset += n
            length -= n

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"FileBackend({str(self.path)!r}, {mode}{', direct' if self.direct else ''})"


def open_image(path: Path | str, *, readonly: bool = False, direct: bool = False) -> FileBackend:
    """Open ``path`` as a disk image (DeviceError naming the path if it cannot be used)."""
    return FileBackend(path, readonly=readonly, direct=direct)
