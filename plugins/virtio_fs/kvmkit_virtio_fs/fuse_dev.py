"""Serve a :class:`~.fuse_server.FuseServer` to the host kernel through
``/dev/fuse``: the host's own FUSE client (a client nobody here wrote) then
drives the same code the virtio-fs device runs, so real programs can be run
against it on the host (tests, ``bench/virtio_fs.py``).

Linux only, and mounting needs CAP_SYS_ADMIN (the mount(2) system call is
made directly, with ``fd=N,rootmode=40000,user_id=..,group_id=..``; no
fusermount helper).
"""
from __future__ import annotations

import ctypes
import errno
import os
import select
import threading

from .fuse_server import MAX_WRITE, FuseServer

__all__ = ["FuseMount", "MountError"]

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
MS_NOSUID = 2
MS_NODEV = 4
BUFFER = MAX_WRITE + (64 << 10)         # a WRITE of max_write plus its headers


class MountError(Exception):
    """The FUSE mount could not be made (no /dev/fuse, no privilege...)."""


class FuseMount:
    """Mount ``server`` on ``mountpoint`` and serve it on a thread until
    :meth:`close` (or use it as a context manager).  ``close`` unmounts
    lazily (MNT_DETACH) and closes the device, which aborts the connection,
    so a failing test never leaves a hung mount behind."""

    def __init__(self, server: FuseServer, mountpoint: str | os.PathLike, *,
                 fsname: str = "kvmkit-virtio-fs", default_permissions: bool = True):
        self.server = server
        self.mountpoint = os.fspath(mountpoint)
        self.fsname = fsname
        self.default_permissions = default_permissions
        self.fd = -1
        self.error: BaseException | None = None
        self._stop_r, self._stop_w = -1, -1
        self._thread: threading.Thread | None = None
        self._mounted = False

    def start(self) -> "FuseMount":
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise MountError(f"/dev/fuse: {e.strerror} (load the fuse module: modprobe fuse)") \
                from None
        opts = (f"fd={self.fd},rootmode=40000,user_id={os.getuid()},group_id={os.getgid()}"
                + (",default_permissions" if self.default_permissions else ""))
        if _libc.mount(self.fsname.encode(), self.mountpoint.encode(), b"fuse.kvmkit",
                       MS_NOSUID | MS_NODEV, opts.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = -1
            raise MountError(f"mount {self.mountpoint}: {os.strerror(err)}"
                             + (" (needs CAP_SYS_ADMIN)" if err == errno.EPERM else ""))
        self._mounted = True
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"fuse:{self.mountpoint}",
                                        daemon=True)
        self._thread.start()
        return self

    def _serve(self) -> None:
        buf = bytearray(BUFFER)
        view = memoryview(buf)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        try:
            while True:
                ready = dict(poller.poll())
                if self._stop_r in ready:
                    return
                try:
                    n = os.readv(self.fd, [buf])
                except OSError as e:
                    if e.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                        continue
                    if e.errno == errno.ENODEV:       # unmounted: the connection is gone
                        return
                    raise
                reply = self.server.handle(view[:n])
                if reply is None:
                    continue
                try:
                    os.writev(self.fd, [reply.header(), reply.body] if reply.body_len
                              else [reply.header()])
                except OSError as e:
                    if e.errno == errno.ENOENT:           # the request was interrupted
                        continue
                    if e.errno == errno.ENODEV:
                        return
                    raise
        except BaseException as e:             # surfaced by close()
            self.error = e

    def close(self) -> None:
        if self._mounted:
            _libc.umount2(self.mountpoint.encode(), MNT_DETACH)
            self._mounted = False
        if self._stop_w >= 0:
            os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(10)
        for fd in (self.fd, self._stop_r, self._stop_w):
            if fd >= 0:
                os.close(fd)            # the last close of /dev/fuse aborts the connection
        self.fd = self._stop_r = self._stop_w = -1
        if self.error is not None:
            raise RuntimeError(f"the FUSE server thread failed: {self.error!r}") from self.error

    def __enter__(self) -> "FuseMount":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()
