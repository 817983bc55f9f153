"""Fuzz the request parser and dispatcher: seeded random requests (valid ones
mutated, and noise) must each get a well-formed reply (or none, for the
opcodes that have none), never an exception, never a change outside the
share, and leave no descriptor behind once the session is reset."""
import os
import random
import struct

from kvmkit_virtio_fs import fuse_proto as p
from kvmkit_virtio_fs.fuse_server import FuseServer

SEED = 0x5EED_F5
INPUTS = 30_000

SEEDS = [
    (p.LOOKUP, b"a\0"), (p.LOOKUP, b"d\0"), (p.GETATTR, p.GETATTR_IN.pack(0, 0, 0)),
    (p.MKDIR, p.MKDIR_IN.pack(0o755, 0) + b"n\0"), (p.OPEN, p.OPEN_IN.pack(os.O_RDWR, 0)),
    (p.CREATE, p.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"c\0"),
    (p.READ, p.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0)),
    (p.WRITE, p.WRITE_IN.pack(1, 0, 5, 0, 0, 0, 0) + b"hello"),
    (p.OPENDIR, p.OPEN_IN.pack(0, 0)), (p.READDIR, p.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0)),
    (p.READDIRPLUS, p.READ_IN.pack(1, 0, 4096, 0, 0, 0, 0)),
    (p.RELEASE, p.RELEASE_IN.pack(1, 0, 0, 0)), (p.RELEASEDIR, p.RELEASE_IN.pack(1, 0, 0, 0)),
    (p.FORGET, p.FORGET_IN.pack(1)), (p.BATCH_FORGET, p.BATCH_FORGET_IN.pack(2, 0)
                                      + p.FORGET_ONE.pack(2, 1) + p.FORGET_ONE.pack(3, 1)),
    (p.SETATTR, p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 3, *([0] * 12))),
    (p.RENAME2, p.RENAME2_IN.pack(1, 0, 0) + b"a\0b\0"), (p.SYMLINK, b"s\0../../etc\0"),
    (p.LINK, p.LINK_IN.pack(2) + b"l\0"), (p.UNLINK, b"b\0"), (p.RMDIR, b"n\0"),
    (p.READLINK, b""), (p.STATFS, b""), (p.ACCESS, p.ACCESS_IN.pack(7, 0)),
    (p.SETXATTR, p.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.x\0y"),
    (p.GETXATTR, p.GETXATTR_IN.pack(64, 0) + b"user.x\0"), (p.LISTXATTR, p.GETXATTR_IN.pack(64, 0)),
    (p.LSEEK, p.LSEEK_IN.pack(1, 0, 3, 0)), (p.FALLOCATE, p.FALLOCATE_IN.pack(1, 0, 100, 0, 0)),
    (p.COPY_FILE_RANGE, p.COPY_FILE_RANGE_IN.pack(1, 0, 2, 1, 10, 5, 0)),
    (p.FSYNC, p.FSYNC_IN.pack(1, 0, 0)), (p.FLUSH, p.FLUSH_IN.pack(1, 0, 0, 0)),
    (p.INIT, p.INIT_IN.pack(7, 37, 0, 0xFFFFFFFF)), (p.INTERRUPT, p.INTERRUPT_IN.pack(3)),
    (p.MKNOD, p.MKNOD_IN.pack(0o10644, 0, 0, 0) + b"m\0"), (p.DESTROY, b""),
]


def _mutate(rng: random.Random, data: bytearray) -> bytearray:
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(6)
        if kind == 0 and data:                                  # flip bits
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif kind == 1:                                         # truncate
            del data[rng.randrange(len(data) + 1):]
        elif kind == 2:                                         # append noise
            data += rng.randbytes(rng.randrange(64))
        elif kind == 3 and len(data) >= 8:                      # an extreme integer somewhere
            i = rng.randrange(len(data) - 7)
            data[i:i + 8] = struct.pack("<Q", rng.choice([0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1]))
        elif kind == 4:                                         # a path-like name
            data += rng.choice([b"..\0", b"/etc/passwd\0", b"a/../..\0", b"\0", b"x" * 300])
        else:
            data = bytearray(rng.randbytes(rng.randrange(200)))
    return data


def _request(rng: random.Random, nodeids: list[int]) -> bytes:
    opcode, args = rng.choice(SEEDS)
    nodeid = rng.choice(nodeids)
    if rng.random() < 0.1:
        opcode = rng.randrange(0, 64)
    args = bytearray(args)
    if rng.random() < 0.7:
        args = _mutate(rng, args)
    raw = bytearray(p.request(opcode, nodeid, bytes(args), unique=rng.getrandbits(64)))
    if rng.random() < 0.1:                                      # the header lies about length
        raw[0:4] = struct.pack("<I", rng.getrandbits(32))
    if rng.random() < 0.05:
        raw = raw[:rng.randrange(len(raw) + 1)]
    return bytes(raw)


def _tree(path):
    return sorted((str(q.relative_to(path)), q.lstat().st_size) for q in path.rglob("*"))


def test_fuzz_requests(tmp_path, capsys):
    share, outside = tmp_path / "share", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("do not touch")
    (share / "a").write_text("abc")
    (share / "d").mkdir()
    before_outside = _tree(outside)
    fds_before = len(os.listdir("/proc/self/fd"))
    server = FuseServer(share, xattr=True, max_inodes=256, max_handles=64)
    rng = random.Random(SEED)
    server.handle(p.request(p.INIT, 0, p.INIT_IN.pack(7, 37, 0, 0xFFFFFFFF)))
    replies = errors = 0
    for i in range(INPUTS):
        raw = _request(rng, [0, 1, 1, 2, 3, 4, 5, rng.getrandbits(64)])
        reply = server.handle(raw)
        if reply is None:
            continue
        out = bytes(reply)
        length, error, unique = p.OUT_HEADER.unpack_from(out)
        assert length == len(out) and -4096 < error <= 0, (i, raw)
        replies += 1
        errors += error != 0
        if not server.initialized:                              # a fuzzed DESTROY
            server.handle(p.request(p.INIT, 0, p.INIT_IN.pack(7, 37, 0, 0xFFFFFFFF)))
        assert server.inode_count <= 256 and server.handle_count <= 64
    assert server.failures == 0                                 # no unexpected exception
    assert _tree(outside) == before_outside
    assert (outside / "secret").read_text() == "do not touch"
    server.close()
    assert len(os.listdir("/proc/self/fd")) == fds_before       # nothing leaked
    with capsys.disabled():
        print(f"\nfuzzed {INPUTS} FUSE requests (seed {SEED:#x}): {replies} replies, "
              f"{errors} errors, {replies - errors} successes")
    assert replies > INPUTS // 2 and replies - errors > 1000     # the fuzzer reaches real work
