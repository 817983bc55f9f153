"""The FUSE wire protocol (Linux ``include/uapi/linux/fuse.h``, 7.x): opcodes,
flags and the structures the server reads and writes, as ``struct.Struct``
objects.  Nothing here does I/O; :func:`parse_header` and the ``Args``
helper turn untrusted request bytes into values or raise
:class:`ProtocolError`, which the server turns into an error reply.

All integers are little-endian (FUSE uses the host's byte order, and kvmkit
runs x86-64 guests on x86-64 hosts).
"""
from __future__ import annotations

import errno
import struct

# The protocol version this server speaks: Linux 6.1's kernel sends 7.37
# (later kernels more); the reply's minor is the smaller of the two.
KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 37
MIN_MINOR_VERSION = 12          # older clients use struct layouts we do not produce

ROOT_ID = 1

# -- opcodes --------------------------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51

OPCODE_NAMES = {v: k for k, v in globals().items()
                if k.isupper() and isinstance(v, int) and 1 <= v <= 51
                and k not in ("KERNEL_VERSION", "KERNEL_MINOR_VERSION", "MIN_MINOR_VERSION",
                              "ROOT_ID")}

# Requests the kernel sends without waiting for a reply.
NO_REPLY = frozenset({FORGET, BATCH_FORGET})

# -- INIT flags -----------------------------------------------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30

# -- other flags ----------------------------------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0

# -- structures -----------------------------------------------------------------------------
IN_HEADER = struct.Struct("<IIQQIIIHH")        # len opcode unique nodeid uid gid pid extlen pad
OUT_HEADER = struct.Struct("<IiQ")             # len error unique
ATTR = struct.Struct("<QQQqqqIIIIIIIIII")      # fuse_attr, 88 bytes (times signed, as Linux reads them)
ENTRY_OUT_HEAD = struct.Struct("<QQQQII")      # nodeid generation entry_valid attr_valid nsecs
ATTR_OUT_HEAD = struct.Struct("<QII")          # attr_valid attr_valid_nsec dummy
INIT_IN = struct.Struct("<IIII")               # major minor max_readahead flags (+ flags2 ...)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")    # 64 bytes
INIT_OUT_COMPAT_22 = 24
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88 bytes
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
OPEN_IN = struct.Struct("<II")
CREATE_IN = struct.Struct("<IIII")
OPEN_OUT = struct.Struct("<QII")
RELEASE_IN = struct.Struct("<QIIQ")
FLUSH_IN = struct.Struct("<QIIQ")
READ_IN = struct.Struct("<QQIIQII")            # 40 bytes
WRITE_IN = struct.Struct("<QQIIQII")           # 40 bytes
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")       # 80 bytes
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN_COMPAT = struct.Struct("<II")      # size flags (without SETXATTR_EXT)
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INTERRUPT_IN = struct.Struct("<Q")
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
COPY_FILE_RANGE_IN = struct.Struct("<QQQQQQQ")
DIRENT_HEAD = struct.Struct("<QQII")           # ino off namelen type, then the name

ENTRY_OUT_SIZE = ENTRY_OUT_HEAD.size + ATTR.size      # 128
ATTR_OUT_SIZE = ATTR_OUT_HEAD.size + ATTR.size        # 104
assert IN_HEADER.size == 40 and OUT_HEADER.size == 16 and ATTR.size == 88
assert SETATTR_IN.size == 88 and INIT_OUT.size == 64 and KSTATFS.size == 80

NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536


def dirent_size(namelen: int, plus: bool = False) -> int:
    """Bytes one READDIR(PLUS) entry takes, 8-byte aligned."""
    n = DIRENT_HEAD.size + namelen + (ENTRY_OUT_SIZE if plus else 0)
    return (n + 7) & ~7


class ProtocolError(Exception):
    """A request that does not parse; ``errno`` is what its reply carries."""

    def __init__(self, message: str, err: int = errno.EINVAL):
        super().__init__(message)
        self.errno = err


class Header:
    """A parsed ``fuse_in_header``."""

    __slots__ = ("len", "opcode", "unique", "nodeid", "uid", "gid", "pid", "extlen")

    def __init__(self, raw) -> None:
        (self.len, self.opcode, self.unique, self.nodeid, self.uid, self.gid, self.pid,
         self.extlen, _) = IN_HEADER.unpack_from(raw)

    @property
    def name(self) -> str:
        return OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode}")

    def __repr__(self) -> str:
        return f"<{self.name} unique={self.unique} nodeid={self.nodeid}>"


def parse_header(raw) -> Header:
    """The request header of ``raw`` (the whole request as the client sent it).

    Raises ProtocolError when ``raw`` is shorter than a header or its ``len``
    disagrees with what arrived (the reply then cannot carry a useful unique,
    so callers answer with unique 0 or drop it).
    """
    if len(raw) < IN_HEADER.size:
        raise ProtocolError(f"request of {len(raw)} bytes is shorter than a FUSE header")
    hdr = Header(raw)
    if hdr.len != len(raw):
        raise ProtocolError(f"{hdr.name}: header says {hdr.len} bytes, {len(raw)} arrived")
    return hdr


class Args:
    """The argument bytes after the header, consumed front to back; every
    read is bounds-checked (ProtocolError when the request is too short)."""

    __slots__ = ("buf", "pos", "opcode")

    def __init__(self, buf, opcode: int = 0) -> None:
        self.buf = memoryview(buf)
        self.pos = 0
        self.opcode = opcode

    @property
    def opname(self) -> str:                # only for error messages: not on the fast path
        return OPCODE_NAMES.get(self.opcode, f"opcode {self.opcode}")

    @property
    def remaining(self) -> int:
        return len(self.buf) - self.pos

    def struct(self, st: struct.Struct) -> tuple:
        if self.remaining < st.size:
            raise ProtocolError(f"{self.opname}: {self.remaining} argument bytes, "
                                f"{st.size} needed")
        out = st.unpack_from(self.buf, self.pos)
        self.pos += st.size
        return out

    def name(self, limit: int = NAME_MAX) -> bytes:
        """A NUL-terminated name of 1..limit bytes."""
        rest = self.buf[self.pos:]
        end = bytes(rest[:limit + 1]).find(b"\0")
        if end < 0:
            raise ProtocolError(f"{self.opname}: name is not NUL-terminated within "
                                f"{limit} bytes", errno.ENAMETOOLONG
                                if len(rest) > limit else errno.EINVAL)
        if end == 0:
            raise ProtocolError(f"{self.opname}: empty name")
        name = bytes(rest[:end])
        self.pos += end + 1
        return name

    def data(self, n: int) -> memoryview:
        if n < 0 or self.remaining < n:
            raise ProtocolError(f"{self.opname}: {n} data bytes announced, "
                                f"{self.remaining} present")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out


def out_header(unique: int, error: int, body_len: int) -> bytes:
    """A ``fuse_out_header``; ``error`` is 0 or a positive errno (sent negated)."""
    return OUT_HEADER.pack(OUT_HEADER.size + body_len, -error if error else 0, unique)


def request(opcode: int, nodeid: int, args: bytes = b"", unique: int = 1, uid: int = 0,
            gid: int = 0, pid: int = 0) -> bytes:
    """Build a request as a client would (tests, fuzzers, the virtio driver model)."""
    return IN_HEADER.pack(IN_HEADER.size + len(args), opcode, unique, nodeid, uid, gid, pid,
                          0, 0) + args
