"""A small FUSE client for tests: builds requests the way the kernel does and
parses the replies.  ``send(raw, reply_size) -> reply bytes or None`` is the
transport: the server directly, or a virtio-fs device through guest memory."""
from __future__ import annotations

import errno
import os
import struct

from kvmkit_virtio_fs import fuse_proto as p


class FuseError(OSError):
    pass


def server_transport(server):
    def send(raw: bytes, reply_size: int):
        reply = server.handle(raw)
        return None if reply is None else bytes(reply)
    return send


class Client:
    def __init__(self, send, uid: int = 0, gid: int = 0):
        self.send = send
        self.uid, self.gid = uid, gid
        self.unique = 0

    def raw(self, opcode: int, nodeid: int, args: bytes = b"", reply_size: int = 1 << 17):
        """(error, body) of one request; None for requests without a reply."""
        self.unique += 2
        out = self.send(p.request(opcode, nodeid, args, self.unique, self.uid, self.gid, 4242),
                        reply_size)
        if out is None:
            return None
        length, error, unique = p.OUT_HEADER.unpack_from(out)
        assert unique == self.unique and length == len(out), (unique, length, len(out))
        return -error, out[p.OUT_HEADER.size:]

    def call(self, opcode, nodeid, args=b"", reply_size=1 << 17) -> bytes:
        err, body = self.raw(opcode, nodeid, args, reply_size)
        if err:
            raise FuseError(err, f"{p.OPCODE_NAMES.get(opcode)}: {os.strerror(err)}")
        return body

    # -- operations ---------------------------------------------------------------------
    def init(self, minor: int = 37, flags: int = 0xFFFFFFFF) -> tuple:
        body = self.call(p.INIT, 0, p.INIT_IN.pack(7, minor, 1 << 17, flags) + bytes(48))
        return p.INIT_OUT.unpack(body) if len(body) == 64 else body

    @staticmethod
    def entry(body: bytes):
        nodeid, gen, *_ = p.ENTRY_OUT_HEAD.unpack_from(body)
        attr = p.ATTR.unpack_from(body, p.ENTRY_OUT_HEAD.size)
        return nodeid, attr

    def lookup(self, parent: int, name: bytes):
        return self.entry(self.call(p.LOOKUP, parent, name + b"\0"))

    def forget(self, nodeid: int, n: int = 1) -> None:
        assert self.raw(p.FORGET, nodeid, p.FORGET_IN.pack(n)) is None

    def getattr(self, nodeid: int):
        return p.ATTR.unpack_from(self.call(p.GETATTR, nodeid, p.GETATTR_IN.pack(0, 0, 0)),
                                  p.ATTR_OUT_HEAD.size)

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755):
        return self.entry(self.call(p.MKDIR, parent, p.MKDIR_IN.pack(mode, 0o022) + name + b"\0"))

    def create(self, parent: int, name: bytes, flags: int = os.O_RDWR, mode: int = 0o644):
        body = self.call(p.CREATE, parent, p.CREATE_IN.pack(flags | os.O_CREAT, mode, 0o022, 0)
                         + name + b"\0")
        nodeid, attr = self.entry(body)
        fh, _, _ = p.OPEN_OUT.unpack_from(body, p.ENTRY_OUT_SIZE)
        return nodeid, fh

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> int:
        return p.OPEN_OUT.unpack(self.call(p.OPEN, nodeid, p.OPEN_IN.pack(flags, 0)))[0]

    def opendir(self, nodeid: int) -> int:
        return p.OPEN_OUT.unpack(self.call(p.OPENDIR, nodeid, p.OPEN_IN.pack(0, 0)))[0]

    def read(self, nodeid: int, fh: int, offset: int, size: int) -> bytes:
        return self.call(p.READ, nodeid, p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                         reply_size=size + 16)

    def write(self, nodeid: int, fh: int, offset: int, data: bytes) -> int:
        body = self.call(p.WRITE, nodeid, p.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0)
                         + data)
        return p.WRITE_OUT.unpack(body)[0]

    def release(self, nodeid: int, fh: int, directory: bool = False) -> None:
        self.call(p.RELEASEDIR if directory else p.RELEASE, nodeid, p.RELEASE_IN.pack(fh, 0, 0, 0))

    def readdir(self, nodeid: int, fh: int, offset: int = 0, size: int = 4096, plus=False):
        body = self.call(p.READDIRPLUS if plus else p.READDIR, nodeid,
                         p.READ_IN.pack(fh, offset, size, 0, 0, 0, 0), reply_size=size + 16)
        out, pos = [], 0
        while pos < len(body):
            nodeid_ = None
            if plus:
                nodeid_, _ = self.entry(body[pos:])
                pos += p.ENTRY_OUT_SIZE
            ino, off, namelen, dtype = p.DIRENT_HEAD.unpack_from(body, pos)
            name = body[pos + p.DIRENT_HEAD.size:pos + p.DIRENT_HEAD.size + namelen]
            out.append((name, off, dtype, nodeid_))
            pos += (p.DIRENT_HEAD.size + namelen + 7) & ~7
        return out

    def listdir(self, nodeid: int, plus: bool = False, size: int = 4096) -> list[bytes]:
        fh = self.opendir(nodeid)
        names, offset = [], 0
        while True:
            entries = self.readdir(nodeid, fh, offset, size, plus)
            if not entries:
                break
            names += [e[0] for e in entries]
            offset = entries[-1][1]
        self.release(nodeid, fh, directory=True)
        return names

    def unlink(self, parent: int, name: bytes) -> None:
        self.call(p.UNLINK, parent, name + b"\0")

    def symlink(self, parent: int, name: bytes, target: bytes):
        return self.entry(self.call(p.SYMLINK, parent, name + b"\0" + target + b"\0"))

    def readlink(self, nodeid: int) -> bytes:
        return self.call(p.READLINK, nodeid)

    def rename(self, parent: int, old: bytes, newparent: int, new: bytes, flags: int = 0):
        self.call(p.RENAME2, parent, p.RENAME2_IN.pack(newparent, flags, 0) + old + b"\0"
                  + new + b"\0")


def errno_of(fn, *args) -> int:
    """The errno a client call fails with (0 if it succeeds)."""
    try:
        fn(*args)
    except FuseError as e:
        return e.errno
    return 0


E = errno
