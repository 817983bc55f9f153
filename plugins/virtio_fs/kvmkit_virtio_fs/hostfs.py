"""The few Linux calls the FUSE server needs that Python's ``os`` lacks:
openat2 (RESOLVE_BENEATH), getdents64, renameat2, fchownat with
AT_EMPTY_PATH, utimensat with UTIME_NOW/UTIME_OMIT, and fallocate with a mode.
Each raises OSError like its ``os`` counterparts.
"""
from __future__ import annotations

import ctypes
import errno
import os
import struct

__all__ = ["raise_fd_limit", "openat2_beneath", "getdents", "renameat2", "fchown_empty", "utimens",
           "fallocate", "UTIME_NOW", "UTIME_OMIT", "HAVE_OPENAT2"]

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long

SYS_getdents64 = 217
SYS_renameat2 = 316
SYS_openat2 = 437

RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


def _check(result: int, what: str, name=None) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), name) if name is not None else \
            OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _probe_openat2() -> bool:
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_BENEATH)
    fd = _syscall(SYS_openat2, AT_FDCWD, b".", ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        os.close(fd)
        return True
    return ctypes.get_errno() != errno.ENOSYS


HAVE_OPENAT2 = _probe_openat2()


def openat2_beneath(dirfd: int, name: bytes, flags: int, mode: int = 0) -> int:
    """Open ``name`` relative to ``dirfd`` so that resolution never leaves the
    tree below ``dirfd`` and follows no symlink at all (RESOLVE_BENEATH |
    RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS).  Without openat2 (Linux
    < 5.6) the caller's single-component name and O_NOFOLLOW give the same
    guarantee, so plain openat is used."""
    flags |= os.O_CLOEXEC | os.O_NOFOLLOW
    if not HAVE_OPENAT2:
        return os.open(name, flags, mode, dir_fd=dirfd)
    how = _OpenHow(flags, mode if flags & os.O_CREAT else 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    return _check(_syscall(SYS_openat2, dirfd, name, ctypes.byref(how), ctypes.sizeof(how)),
                  "openat2", name)


_DIRENT = struct.Struct("<QqHB")       # d_ino d_off d_reclen d_type, then the name


def getdents(fd: int, size: int) -> list[tuple[int, int, int, bytes]]:
    """One getdents64 call reading at most ``size`` bytes from directory ``fd``
    at its current position: ``(ino, next_offset, type, name)`` entries ([]
    at the end)."""
    buf = ctypes.create_string_buffer(size)
    n = _check(_syscall(SYS_getdents64, fd, buf, size), "getdents64")
    raw = buf.raw[:n]
    out, pos = [], 0
    while pos + _DIRENT.size <= n:
        ino, off, reclen, dtype = _DIRENT.unpack_from(raw, pos)
        if reclen < _DIRENT.size or pos + reclen > n:
            break
        name = raw[pos + _DIRENT.size:pos + reclen].split(b"\0", 1)[0]
        out.append((ino, off, dtype, name))
        pos += reclen
    return out


def renameat2(olddirfd: int, old: bytes, newdirfd: int, new: bytes, flags: int) -> None:
    _check(_syscall(SYS_renameat2, olddirfd, old, newdirfd, new, ctypes.c_uint(flags)),
           "renameat2", old)


def fchown_empty(fd: int, uid: int, gid: int) -> None:
    """fchownat(fd, "", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW); -1 keeps a field."""
    _libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32,
                               ctypes.c_uint32, ctypes.c_int]
    _check(_libc.fchownat(fd, b"", uid & 0xFFFFFFFF, gid & 0xFFFFFFFF,
                          AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "fchownat")


def utimens(fd: int, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(fd, "", ..., AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW) on an
    O_PATH descriptor (a symlink's own times too) with (sec, nsec) pairs;
    nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW), "utimensat")


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    _check(_libc.fallocate(fd, mode, offset, length), "fallocate")


def raise_fd_limit(wanted: int) -> int:
    """Lift RLIMIT_NOFILE toward ``wanted`` descriptors (the server holds an
    O_PATH descriptor per inode the client knows): the soft limit up to the
    hard one, and the hard one too where the process may (CAP_SYS_RESOURCE),
    up to /proc/sys/fs/nr_open.  Returns the soft limit now in force."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft == inf or soft >= wanted:
        return wanted if soft == inf else soft
    if hard != inf and hard < wanted:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
        except (OSError, ValueError):
            ceiling = hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, ceiling),) * 2)
            return min(wanted, ceiling)
        except (ValueError, OSError):
            pass
    target = wanted if hard == inf else min(wanted, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target
