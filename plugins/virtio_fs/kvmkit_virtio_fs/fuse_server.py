"""A FUSE filesystem server that exports one host directory.

It speaks the FUSE protocol (:mod:`.fuse_proto`) and knows nothing of where
requests come from: the virtio-fs device feeds it from guest memory, and
:mod:`.fuse_dev` from the host kernel's ``/dev/fuse``.  One request in, at
most one reply out (:meth:`FuseServer.handle`); it is not thread-safe (one
caller at a time).

Security model (the client is hostile):

- Every inode the client may name is an entry of a table the server filled
  itself; a node id is an opaque counter value, never a host inode number,
  and an unknown one is answered with ESTALE.  Each entry holds an
  ``O_PATH`` descriptor of its host file, so a rename on the host or by the
  client does not make it point elsewhere.
- A name from the client is one path component (no ``/``, not ``.`` or
  ``..``) and is resolved only relative to its parent's descriptor, with
  ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``
  and ``O_NOFOLLOW``: the server never follows a symlink, so nothing outside
  the shared directory is reachable.  Symlinks are data for the client.
- Only regular files are opened for I/O; device nodes cannot be created.
- Memory per request is bounded (READ and READDIR sizes, xattr sizes, names);
  the inode and open-handle tables are bounded (ENFILE / EMFILE when full).
- ``readonly`` refuses every request that would change the host tree with
  EROFS.
- A request that does not parse, or an unexpected error, becomes an error
  reply; nothing a client sends raises out of :meth:`handle`.
"""
from __future__ import annotations

import errno
import logging
import os
import stat
from typing import Sequence

from . import fuse_proto as p
from . import hostfs

__all__ = ["FuseServer", "Reply", "CACHE_MODES"]

CACHE_MODES = ("never", "auto", "always")
# (entry/attr timeout in seconds, open flags) per cache mode
_CACHE = {
    "never": (0, p.FOPEN_DIRECT_IO),
    "auto": (1, 0),
    "always": (86400, p.FOPEN_KEEP_CACHE | p.FOPEN_CACHE_DIR),
}

MAX_WRITE = 1 << 20                 # largest READ/WRITE payload, negotiated in INIT
MAX_READDIR = 128 << 10             # largest READDIR(PLUS) reply
MAX_COPY = 64 << 20                 # largest COPY_FILE_RANGE in one request
PATH_MAX = 4096
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_PREFIX = b"user."             # the only xattr namespace the client reaches

MUTATING = frozenset({p.SETATTR, p.SYMLINK, p.MKNOD, p.MKDIR, p.UNLINK, p.RMDIR, p.RENAME,
                      p.RENAME2, p.LINK, p.CREATE, p.WRITE, p.SETXATTR, p.REMOVEXATTR,
                      p.FALLOCATE, p.COPY_FILE_RANGE, p.TMPFILE})

_S_TO_DT = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10, stat.S_IFCHR: 2,
            stat.S_IFBLK: 6, stat.S_IFIFO: 1, stat.S_IFSOCK: 12}


class Reply:
    """What goes back for one request: ``error`` (0 or a positive errno) and
    the body (``body`` bytes, or ``inplace`` bytes the server already wrote
    into the caller's ``read_into`` buffers, which follow the header)."""

    __slots__ = ("unique", "error", "body", "inplace")

    def __init__(self, unique: int, error: int = 0, body=b"", inplace: int = 0):
        self.unique = unique
        self.error = error
        self.body = body if not error else b""
        self.inplace = inplace if not error else 0

    @property
    def body_len(self) -> int:
        return self.inplace + len(self.body)

    def header(self) -> bytes:
        return p.out_header(self.unique, self.error, self.body_len)

    def __bytes__(self) -> bytes:
        return self.header() + bytes(self.body)

    def __repr__(self) -> str:
        return f"Reply(unique={self.unique}, error={self.error}, len={self.body_len})"


class _Inode:
    __slots__ = ("nodeid", "fd", "key", "nlookup", "fmt")

    def __init__(self, nodeid: int, fd: int, key: tuple[int, int], fmt: int):
        self.nodeid, self.fd, self.key, self.fmt = nodeid, fd, key, fmt
        self.nlookup = 0


class _Handle:
    __slots__ = ("fd", "inode", "is_dir")

    def __init__(self, fd: int, inode: _Inode, is_dir: bool):
        self.fd, self.inode, self.is_dir = fd, inode, is_dir


def _encode_dev(dev: int) -> int:
    """A host dev_t as the kernel's 32-bit "new" encoding that FUSE carries."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | ((major & 0xFFF) << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def _decode_dev(raw: int) -> int:
    return os.makedev((raw & 0xFFF00) >> 8, (raw & 0xFF) | ((raw >> 12) & 0xFFF00))


def _proc(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _trim(views: Sequence[memoryview], n: int) -> list[memoryview]:
    out = []
    for v in views:
        if n <= 0:
            break
        out.append(v[:n])
        n -= len(out[-1])
    return out


class FuseServer:
    """Serve the host directory ``root`` over FUSE.

    ``readonly``  refuse every change with EROFS
    ``cache``     "never" (no client caching: attributes, names and data are
                  asked for every time, direct I/O), "auto" (1 s attribute and
                  name timeouts, page cache dropped when a file's mtime or
                  size changed), "always" (1 day timeouts, the page cache kept
                  across opens: only for trees nothing else changes)
    ``xattr``     serve extended attributes (the ``user.`` namespace only)
    ``max_inodes``/``max_handles``  bound the inode and open-file tables
    """

    def __init__(self, root: str | os.PathLike, *, readonly: bool = False, cache: str = "auto",
                 xattr: bool = False, max_inodes: int = 262144, max_handles: int = 4096,
                 log: logging.Logger | None = None):
        if cache not in _CACHE:
            raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
        self.root = os.fspath(root)
        self.readonly = bool(readonly)
        self.cache = cache
        self.xattr = bool(xattr)
        self.max_inodes = max_inodes
        self.max_handles = max_handles
        self.log = log or logging.getLogger(__name__)
        self._timeout, self._open_flags = _CACHE[cache]
        root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(root_fd)
        self._root = _Inode(p.ROOT_ID, root_fd, (st.st_dev, st.st_ino), stat.S_IFDIR)
        self._root.nlookup = 1 << 62            # never forgotten
        self._inodes: dict[int, _Inode] = {}
        self._by_key: dict[tuple[int, int], _Inode] = {}
        self._handles: dict[int, _Handle] = {}
        self._next_nodeid = 2
        self._next_fh = 1
        self._umask = os.umask(0o022)
        os.umask(self._umask)
        self._chown_new = os.geteuid() == 0
        self.initialized = False
        self.minor = 0
        self.requests = 0
        self.errors = 0                 # requests that did not parse
        self.failures = 0               # unexpected exceptions (server bugs), answered EIO
        self._reset_tables()
        self._ops = {
            p.INIT: self._init, p.DESTROY: self._destroy, p.LOOKUP: self._lookup,
            p.FORGET: self._forget, p.BATCH_FORGET: self._batch_forget,
            p.GETATTR: self._getattr, p.SETATTR: self._setattr, p.READLINK: self._readlink,
            p.SYMLINK: self._symlink, p.MKNOD: self._mknod, p.MKDIR: self._mkdir,
            p.UNLINK: self._unlink, p.RMDIR: self._rmdir, p.RENAME: self._rename,
            p.RENAME2: self._rename2, p.LINK: self._link, p.OPEN: self._open,
            p.READ: self._read, p.WRITE: self._write, p.STATFS: self._statfs,
            p.RELEASE: self._release, p.FSYNC: self._fsync, p.FLUSH: self._flush,
            p.OPENDIR: self._opendir, p.READDIR: self._readdir,
            p.READDIRPLUS: self._readdirplus, p.RELEASEDIR: self._release,
            p.FSYNCDIR: self._fsync, p.ACCESS: self._access, p.CREATE: self._create,
            p.SETXATTR: self._setxattr, p.GETXATTR: self._getxattr,
            p.LISTXATTR: self._listxattr, p.REMOVEXATTR: self._removexattr,
            p.LSEEK: self._lseek, p.FALLOCATE: self._fallocate,
            p.COPY_FILE_RANGE: self._copy_file_range,
        }

    # -- tables ---------------------------------------------------------------------------
    def _reset_tables(self) -> None:
        for h in self._handles.values():
            os.close(h.fd)
        for ino in self._inodes.values():
            if ino is not self._root:
                os.close(ino.fd)
        self._handles = {}
        self._inodes = {p.ROOT_ID: self._root}
        self._by_key = {self._root.key: self._root}

    @property
    def inode_count(self) -> int:
        return len(self._inodes)

    @property
    def handle_count(self) -> int:
        return len(self._handles)

    def reset(self) -> None:
        """Forget every inode and handle (the client went away or reset)."""
        self._reset_tables()
        self.initialized = False

    def close(self) -> None:
        self._reset_tables()
        os.close(self._root.fd)

    def _inode(self, nodeid: int) -> _Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise OSError(errno.ESTALE, "unknown node id")
        return ino

    def _handle(self, fh: int, want_dir: bool | None = None) -> _Handle:
        h = self._handles.get(fh)
        if h is None or (want_dir is not None and h.is_dir != want_dir):
            raise OSError(errno.EBADF, "unknown file handle")
        return h

    def _add_handle(self, fd: int, inode: _Inode, is_dir: bool) -> int:
        if len(self._handles) >= self.max_handles:
            os.close(fd)
            raise OSError(errno.EMFILE, "open-file table full")
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = _Handle(fd, inode, is_dir)
        return fh

    @staticmethod
    def _check_name(name: bytes) -> bytes:
        if b"/" in name or name in (b".", b".."):
            raise OSError(errno.EINVAL, "not a single path component")
        return name

    def _do_lookup(self, parent: _Inode, name: bytes) -> tuple[_Inode, os.stat_result]:
        """Find ``name`` in ``parent``; counts one lookup for the client."""
        self._check_name(name)
        if parent.fmt != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "parent is not a directory")
        fd = hostfs.openat2_beneath(parent.fd, name, os.O_PATH)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        ino = self._by_key.get(key)
        if ino is not None:
            os.close(fd)
        else:
            if len(self._inodes) >= self.max_inodes:
                os.close(fd)
                raise OSError(errno.ENFILE, "inode table full")
            ino = _Inode(self._next_nodeid, fd, key, stat.S_IFMT(st.st_mode))
            self._next_nodeid += 1
            self._inodes[ino.nodeid] = ino
            self._by_key[key] = ino
        ino.nlookup += 1
        return ino, st

    def _forget_one(self, nodeid: int, n: int) -> None:
        ino = self._inodes.get(nodeid)
        if ino is None or ino is self._root:
            return
        ino.nlookup -= min(n, ino.nlookup)
        if ino.nlookup == 0:
            del self._inodes[nodeid]
            if self._by_key.get(ino.key) is ino:
                del self._by_key[ino.key]
            os.close(ino.fd)

    # -- encoding -------------------------------------------------------------------------
    def _attr(self, st: os.stat_result) -> bytes:
        return p.ATTR.pack(
            st.st_ino, st.st_size, st.st_blocks,
            st.st_atime_ns // 10**9, st.st_mtime_ns // 10**9, st.st_ctime_ns // 10**9,
            st.st_atime_ns % 10**9, st.st_mtime_ns % 10**9, st.st_ctime_ns % 10**9,
            st.st_mode, min(st.st_nlink, 0xFFFFFFFF), st.st_uid, st.st_gid,
            _encode_dev(st.st_rdev), st.st_blksize, 0)

    def _entry(self, ino: _Inode | None, st: os.stat_result | None) -> bytes:
        if ino is None:                 # a negative entry: "no such name", cached for the timeout
            return p.ENTRY_OUT_HEAD.pack(0, 0, self._timeout, 0, 0, 0) + bytes(p.ATTR.size)
        return (p.ENTRY_OUT_HEAD.pack(ino.nodeid, 0, self._timeout, self._timeout, 0, 0)
                + self._attr(st))

    def _attr_out(self, st: os.stat_result) -> bytes:
        return p.ATTR_OUT_HEAD.pack(self._timeout, 0, 0) + self._attr(st)

    # -- the entry point ------------------------------------------------------------------
    def handle(self, raw, payload: Sequence[memoryview] | None = None,
               read_into: Sequence[memoryview] | None = None) -> Reply | None:
        """Serve one request.

        ``raw`` is the request as sent (header and arguments).  A transport
        that keeps a WRITE's data elsewhere (guest memory) passes the header
        and ``fuse_write_in`` as ``raw`` and the data as ``payload`` views.
        With ``read_into`` (writable views that follow the reply header in the
        transport's buffer) READ data goes there directly (``Reply.inplace``).
        Returns None for requests that get no reply (FORGET, BATCH_FORGET).
        """
        self.requests += 1
        extra = sum(len(v) for v in payload) if payload else 0
        try:
            if len(raw) < p.IN_HEADER.size:
                raise p.ProtocolError(f"request of {len(raw)} bytes is shorter than a header")
            hdr = p.Header(raw)
        except p.ProtocolError as e:
            self.errors += 1
            self.log.debug("fuse: %s", e)
            return Reply(0, e.errno)
        try:
            if hdr.len != len(raw) + extra:
                raise p.ProtocolError(f"{hdr.name}: header says {hdr.len} bytes, "
                                      f"{len(raw) + extra} arrived")
            if payload is not None and hdr.opcode != p.WRITE:
                raise p.ProtocolError(f"{hdr.name}: separate payload only for WRITE")
            op = self._ops.get(hdr.opcode)
            if op is None:
                raise OSError(errno.ENOSYS, f"{hdr.name} is not supported")
            if not self.initialized and hdr.opcode != p.INIT:
                raise OSError(errno.EIO, f"{hdr.name} before INIT")
            if self.readonly and hdr.opcode in MUTATING:
                raise OSError(errno.EROFS, "read-only share")
            args = p.Args(memoryview(raw)[p.IN_HEADER.size:], hdr.opcode)
            if hdr.opcode == p.WRITE:
                result = op(hdr, args, payload)
            elif hdr.opcode == p.READ:
                result = op(hdr, args, read_into)
            else:
                result = op(hdr, args)
        except p.ProtocolError as e:
            self.errors += 1
            self.log.debug("fuse: %s", e)
            return None if hdr.opcode in p.NO_REPLY else Reply(hdr.unique, e.errno)
        except OSError as e:
            err = e.errno if isinstance(e.errno, int) and 0 < e.errno < 4096 else errno.EIO
            return None if hdr.opcode in p.NO_REPLY else Reply(hdr.unique, err)
        except Exception:                   # a server bug must not take the device down
            self.failures += 1
            self.log.exception("fuse: %s failed", hdr.name)
            return None if hdr.opcode in p.NO_REPLY else Reply(hdr.unique, errno.EIO)
        if hdr.opcode in p.NO_REPLY:
            return None
        if isinstance(result, Reply):
            result.unique = hdr.unique
            return result
        return Reply(hdr.unique, 0, result)

    # -- session --------------------------------------------------------------------------
    def _init(self, hdr, args):
        major, minor, max_readahead, flags = args.struct(p.INIT_IN)
        if major < p.KERNEL_VERSION:
            raise OSError(errno.EPROTO, f"FUSE {major}.{minor} is too old")
        if major > p.KERNEL_VERSION:            # the client retries with our major
            return p.INIT_OUT.pack(p.KERNEL_VERSION, p.KERNEL_MINOR_VERSION,
                                   0, 0, 0, 0, 0, 0, 0, 0, 0)[:8]
        if minor < p.MIN_MINOR_VERSION:
            raise OSError(errno.EPROTO, f"FUSE 7.{minor} is too old")
        if self.initialized:
            self._reset_tables()
        self.minor = min(minor, p.KERNEL_MINOR_VERSION)
        want = (p.ASYNC_READ | p.ATOMIC_O_TRUNC | p.BIG_WRITES | p.DO_READDIRPLUS
                | p.READDIRPLUS_AUTO | p.PARALLEL_DIROPS | p.MAX_PAGES | p.ABORT_ERROR)
        if self.cache == "auto":
            want |= p.AUTO_INVAL_DATA
        out_flags = flags & want
        self.initialized = True
        out = p.INIT_OUT.pack(p.KERNEL_VERSION, self.minor, max_readahead, out_flags,
                              16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0, 0)
        return out if self.minor >= 23 else out[:p.INIT_OUT_COMPAT_22]

    def _destroy(self, hdr, args):
        self.reset()
        return b""

    # -- names ----------------------------------------------------------------------------
    def _lookup(self, hdr, args):
        parent = self._inode(hdr.nodeid)
        name = args.name()
        try:
            ino, st = self._do_lookup(parent, name)
        except OSError as e:
            if e.errno == errno.ENOENT and self._timeout:
                return self._entry(None, None)
            raise
        return self._entry(ino, st)

    def _forget(self, hdr, args):
        (n,) = args.struct(p.FORGET_IN)
        self._forget_one(hdr.nodeid, n)

    def _batch_forget(self, hdr, args):
        count, _ = args.struct(p.BATCH_FORGET_IN)
        count = min(count, args.remaining // p.FORGET_ONE.size)
        for _ in range(count):
            nodeid, n = args.struct(p.FORGET_ONE)
            self._forget_one(nodeid, n)

    def _new_entry(self, hdr, parent: _Inode, name: bytes, mode: int | None):
        """After creating ``name``: fix its mode against our own umask, give it
        to the requesting user (when we may), and look it up."""
        if self._chown_new:
            os.chown(name, hdr.uid, hdr.gid, dir_fd=parent.fd, follow_symlinks=False)
        ino, st = self._do_lookup(parent, name)
        if mode is not None and ino.fmt != stat.S_IFLNK and st.st_mode & 0o7777 != mode & 0o7777:
            os.chmod(_proc(ino.fd), mode & 0o7777)
            st = os.fstat(ino.fd)
        return ino, st

    def _mknod(self, hdr, args):
        mode, _rdev, _umask, _ = args.struct(p.MKNOD_IN)
        mode &= 0o177777
        name = self._check_name(args.name())
        parent = self._inode(hdr.nodeid)
        fmt = stat.S_IFMT(mode)
        if fmt in (stat.S_IFCHR, stat.S_IFBLK):
            raise OSError(errno.EPERM, "device nodes are not created on the host")
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise OSError(errno.EINVAL, "bad file type")
        os.mknod(name, mode, 0, dir_fd=parent.fd)
        return self._entry(*self._new_entry(hdr, parent, name, mode))

    def _mkdir(self, hdr, args):
        mode, _umask = args.struct(p.MKDIR_IN)
        mode &= 0o7777
        name = self._check_name(args.name())
        parent = self._inode(hdr.nodeid)
        os.mkdir(name, mode & 0o7777, dir_fd=parent.fd)
        return self._entry(*self._new_entry(hdr, parent, name, mode))

    def _symlink(self, hdr, args):
        name = self._check_name(args.name())
        target = args.name(PATH_MAX)
        parent = self._inode(hdr.nodeid)
        os.symlink(target, name, dir_fd=parent.fd)
        return self._entry(*self._new_entry(hdr, parent, name, None))

    def _link(self, hdr, args):
        (old,) = args.struct(p.LINK_IN)
        name = self._check_name(args.name())
        target = self._inode(old)
        parent = self._inode(hdr.nodeid)
        if target.fmt == stat.S_IFDIR:
            raise OSError(errno.EPERM, "hard links to directories")
        os.link(_proc(target.fd), name, dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._entry(*self._do_lookup(parent, name))

    def _unlink(self, hdr, args):
        name = self._check_name(args.name())
        os.unlink(name, dir_fd=self._inode(hdr.nodeid).fd)
        return b""

    def _rmdir(self, hdr, args):
        name = self._check_name(args.name())
        os.rmdir(name, dir_fd=self._inode(hdr.nodeid).fd)
        return b""

    def _rename(self, hdr, args):
        (newdir,) = args.struct(p.RENAME_IN)
        return self._do_rename(hdr, args, newdir, 0)

    def _rename2(self, hdr, args):
        newdir, flags, _ = args.struct(p.RENAME2_IN)
        return self._do_rename(hdr, args, newdir, flags)

    def _do_rename(self, hdr, args, newdir: int, flags: int):
        old = self._check_name(args.name())
        new = self._check_name(args.name())
        src, dst = self._inode(hdr.nodeid), self._inode(newdir)
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise OSError(errno.EINVAL, "unsupported rename flags")
        if flags:
            hostfs.renameat2(src.fd, old, dst.fd, new, flags)
        else:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        return b""

    def _readlink(self, hdr, args):
        ino = self._inode(hdr.nodeid)
        if ino.fmt != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        target = os.readlink(b"", dir_fd=ino.fd)
        return target[:PATH_MAX]

    # -- attributes -----------------------------------------------------------------------
    def _getattr(self, hdr, args):
        ino = self._inode(hdr.nodeid)
        return self._attr_out(os.fstat(ino.fd))

    def _setattr(self, hdr, args):
        (valid, _, fh, size, _owner, atime, mtime, _ctime, atimensec, mtimensec, _ctimensec,
         mode, _, uid, gid, _) = args.struct(p.SETATTR_IN)
        ino = self._inode(hdr.nodeid)
        handle = self._handles.get(fh) if valid & p.FATTR_FH else None
        if handle is not None and handle.inode is not ino:
            raise OSError(errno.EBADF, "handle of another inode")
        is_link = ino.fmt == stat.S_IFLNK
        if valid & p.FATTR_MODE and not is_link:
            os.chmod(_proc(ino.fd), mode & 0o7777)
        if valid & (p.FATTR_UID | p.FATTR_GID):
            hostfs.fchown_empty(ino.fd, uid if valid & p.FATTR_UID else -1,
                                gid if valid & p.FATTR_GID else -1)
        if valid & p.FATTR_SIZE:
            if ino.fmt != stat.S_IFREG:
                raise OSError(errno.EINVAL if ino.fmt != stat.S_IFDIR else errno.EISDIR, "size")
            if handle is not None:
                os.ftruncate(handle.fd, size)
            else:
                os.truncate(_proc(ino.fd), size)
        if valid & (p.FATTR_ATIME | p.FATTR_MTIME | p.FATTR_ATIME_NOW | p.FATTR_MTIME_NOW):
            def when(set_bit, now_bit, sec, nsec):
                if valid & now_bit:
                    return (0, hostfs.UTIME_NOW)
                if valid & set_bit:
                    return (sec, min(nsec, 999_999_999))
                return (0, hostfs.UTIME_OMIT)
            hostfs.utimens(ino.fd, when(p.FATTR_ATIME, p.FATTR_ATIME_NOW, atime, atimensec),
                           when(p.FATTR_MTIME, p.FATTR_MTIME_NOW, mtime, mtimensec))
        return self._attr_out(os.fstat(ino.fd))

    def _access(self, hdr, args):
        mask, _ = args.struct(p.ACCESS_IN)
        st = os.fstat(self._inode(hdr.nodeid).fd)
        if mask & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, "read-only share")
        if mask == os.F_OK:
            return b""
        mode = st.st_mode
        if hdr.uid == 0:
            if mask & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
                raise OSError(errno.EACCES, "no execute bit")
            return b""
        if hdr.uid == st.st_uid:
            bits = (mode >> 6) & 7
        elif hdr.gid == st.st_gid:
            bits = (mode >> 3) & 7
        else:
            bits = mode & 7
        if mask & ~bits & 7:
            raise OSError(errno.EACCES, "permission denied")
        return b""

    def _statfs(self, hdr, args):
        s = os.fstatvfs(self._inode(hdr.nodeid).fd)
        return p.KSTATFS.pack(s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree,
                              s.f_bsize, min(s.f_namemax, p.NAME_MAX), s.f_frsize, 0)

    # -- files ----------------------------------------------------------------------------
    def _open_flags_for_host(self, flags: int) -> int:
        access = flags & os.O_ACCMODE
        if self.readonly and (access != os.O_RDONLY or flags & os.O_TRUNC):
            raise OSError(errno.EROFS, "read-only share")
        keep = os.O_ACCMODE | os.O_APPEND | os.O_TRUNC | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC
        return (flags & keep) | os.O_CLOEXEC | os.O_NOCTTY

    def _open_reply(self, fh: int) -> bytes:
        return p.OPEN_OUT.pack(fh, self._open_flags, 0)

    def _open(self, hdr, args):
        flags, _ = args.struct(p.OPEN_IN)
        ino = self._inode(hdr.nodeid)
        if ino.fmt != stat.S_IFREG:
            raise OSError(errno.EISDIR if ino.fmt == stat.S_IFDIR else errno.EACCES,
                          "only regular files are opened")
        host_flags = self._open_flags_for_host(flags)
        if len(self._handles) >= self.max_handles:
            raise OSError(errno.EMFILE, "open-file table full")
        fd = os.open(_proc(ino.fd), host_flags)
        return self._open_reply(self._add_handle(fd, ino, False))

    def _create(self, hdr, args):
        flags, mode, _umask, _ = args.struct(p.CREATE_IN)
        name = self._check_name(args.name())
        parent = self._inode(hdr.nodeid)
        host_flags = self._open_flags_for_host(flags) | os.O_CREAT | (flags & os.O_EXCL)
        if len(self._handles) >= self.max_handles:
            raise OSError(errno.EMFILE, "open-file table full")
        fd = hostfs.openat2_beneath(parent.fd, name, host_flags, mode & 0o7777)
        try:
            ino, st = self._new_entry(hdr, parent, name, mode)
        except BaseException:
            os.close(fd)
            raise
        fh = self._add_handle(fd, ino, False)
        return self._entry(ino, st) + self._open_reply(fh)

    def _read(self, hdr, args, read_into):
        fh, offset, size, *_ = args.struct(p.READ_IN)
        h = self._handle(fh, want_dir=False)
        size = min(size, MAX_WRITE)
        if read_into is not None:
            views = _trim(read_into, size)
            n = os.preadv(h.fd, views, offset) if views else 0
            return Reply(0, 0, b"", n)
        return os.pread(h.fd, size, offset)

    def _write(self, hdr, args, payload):
        fh, offset, size, *_ = args.struct(p.WRITE_IN)
        if size > MAX_WRITE:
            raise p.ProtocolError(f"WRITE of {size} bytes is above max_write")
        h = self._handle(fh, want_dir=False)
        if payload is not None:
            if sum(len(v) for v in payload) != size:
                raise p.ProtocolError("WRITE: payload length disagrees with size")
            views = list(payload)
        else:
            views = [args.data(size)]
        n = os.pwritev(h.fd, views, offset) if size else 0
        return p.WRITE_OUT.pack(n, 0)

    def _flush(self, hdr, args):
        fh, *_ = args.struct(p.FLUSH_IN)
        self._handle(fh, want_dir=False)
        return b""

    def _release(self, hdr, args):
        fh, *_ = args.struct(p.RELEASE_IN)
        want_dir = hdr.opcode == p.RELEASEDIR
        h = self._handle(fh, want_dir=want_dir)
        del self._handles[fh]
        os.close(h.fd)
        return b""

    def _fsync(self, hdr, args):
        fh, flags, _ = args.struct(p.FSYNC_IN)
        h = self._handle(fh, want_dir=hdr.opcode == p.FSYNCDIR)
        if flags & p.FSYNC_FDATASYNC:
            os.fdatasync(h.fd)
        else:
            os.fsync(h.fd)
        return b""

    def _lseek(self, hdr, args):
        fh, offset, whence, _ = args.struct(p.LSEEK_IN)
        h = self._handle(fh, want_dir=False)
        if whence not in (os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE):
            raise OSError(errno.EINVAL, "bad whence")
        return p.LSEEK_OUT.pack(os.lseek(h.fd, offset, whence))

    def _fallocate(self, hdr, args):
        fh, offset, length, mode, _ = args.struct(p.FALLOCATE_IN)
        h = self._handle(fh, want_dir=False)
        hostfs.fallocate(h.fd, mode, offset, length)
        return b""

    def _copy_file_range(self, hdr, args):
        fh_in, off_in, nodeid_out, fh_out, off_out, length, flags = \
            args.struct(p.COPY_FILE_RANGE_IN)
        src = self._handle(fh_in, want_dir=False)
        dst = self._handle(fh_out, want_dir=False)
        if dst.inode.nodeid != nodeid_out or flags:
            raise OSError(errno.EINVAL, "copy_file_range arguments")
        n = os.copy_file_range(src.fd, dst.fd, min(length, MAX_COPY), off_in, off_out)
        return p.WRITE_OUT.pack(n, 0)

    # -- directories ----------------------------------------------------------------------
    def _opendir(self, hdr, args):
        flags, _ = args.struct(p.OPEN_IN)
        ino = self._inode(hdr.nodeid)
        if ino.fmt != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        if len(self._handles) >= self.max_handles:
            raise OSError(errno.EMFILE, "open-file table full")
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=ino.fd)
        cache_dir = p.FOPEN_CACHE_DIR if self.cache == "always" else 0
        return p.OPEN_OUT.pack(self._add_handle(fd, ino, True), cache_dir, 0)

    def _readdir(self, hdr, args):
        return self._list(hdr, args, plus=False)

    def _readdirplus(self, hdr, args):
        return self._list(hdr, args, plus=True)

    def _list(self, hdr, args, plus: bool) -> bytes:
        fh, offset, size, *_ = args.struct(p.READ_IN)
        h = self._handle(fh, want_dir=True)
        size = min(size, MAX_READDIR)
        out = bytearray()
        os.lseek(h.fd, offset, os.SEEK_SET)
        while True:
            entries = hostfs.getdents(h.fd, max(size, 4096))
            if not entries:
                break
            for d_ino, d_off, d_type, name in entries:
                need = p.dirent_size(len(name), plus)
                if len(out) + need > size:
                    return bytes(out)
                head = p.DIRENT_HEAD.pack(d_ino, d_off & 0xFFFFFFFFFFFFFFFF, len(name), d_type)
                if plus:
                    entry = self._entry_for_listing(h.inode, name)
                    out += entry
                out += head + name + bytes(need - len(head) - len(name)
                                           - (p.ENTRY_OUT_SIZE if plus else 0))
            os.lseek(h.fd, entries[-1][1], os.SEEK_SET)
        return bytes(out)

    def _entry_for_listing(self, parent: _Inode, name: bytes) -> bytes:
        """READDIRPLUS's entry for ``name``: looked up (one more nlookup), or
        node id 0 (the client then skips it) for ``.``, ``..`` and names
        that vanished meanwhile."""
        if name in (b".", b".."):
            return bytes(p.ENTRY_OUT_SIZE)
        try:
            return self._entry(*self._do_lookup(parent, name))
        except OSError:
            return bytes(p.ENTRY_OUT_SIZE)

    # -- extended attributes --------------------------------------------------------------
    def _xattr_target(self, hdr) -> str:
        if not self.xattr:
            raise OSError(errno.ENOSYS, "xattrs are off")
        ino = self._inode(hdr.nodeid)
        if ino.fmt not in (stat.S_IFREG, stat.S_IFDIR):
            raise OSError(errno.EOPNOTSUPP if hdr.opcode in (p.SETXATTR, p.REMOVEXATTR)
                          else errno.ENODATA, "xattrs only on files and directories")
        return _proc(ino.fd)

    @staticmethod
    def _xattr_name(args, opcode: int) -> bytes:
        name = args.name(p.XATTR_NAME_MAX)
        if not name.startswith(XATTR_PREFIX):      # ACLs, security.*, trusted.*: not ours
            raise OSError(errno.EOPNOTSUPP if opcode in (p.SETXATTR, p.REMOVEXATTR)
                          else errno.ENODATA, "only user.* xattrs are served")
        return name

    def _setxattr(self, hdr, args):
        size, flags = args.struct(p.SETXATTR_IN_COMPAT)
        path = self._xattr_target(hdr)
        name = self._xattr_name(args, hdr.opcode)
        if size > p.XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, "xattr value too large")
        value = bytes(args.data(size))
        os.setxattr(path, name, value, flags & (os.XATTR_CREATE | os.XATTR_REPLACE))
        return b""

    def _getxattr(self, hdr, args):
        size, _ = args.struct(p.GETXATTR_IN)
        path = self._xattr_target(hdr)
        name = self._xattr_name(args, hdr.opcode)
        value = os.getxattr(path, name)
        if size == 0:
            return p.GETXATTR_OUT.pack(len(value), 0)
        if len(value) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return value

    def _listxattr(self, hdr, args):
        size, _ = args.struct(p.GETXATTR_IN)
        path = self._xattr_target(hdr)
        names = b"".join(os.fsencode(n) + b"\0" for n in os.listxattr(path)
                         if os.fsencode(n).startswith(XATTR_PREFIX))
        if size == 0:
            return p.GETXATTR_OUT.pack(len(names), 0)
        if len(names) > size:
            raise OSError(errno.ERANGE, "buffer too small")
        return names

    def _removexattr(self, hdr, args):
        path = self._xattr_target(hdr)
        os.removexattr(path, self._xattr_name(args, hdr.opcode))
        return b""
