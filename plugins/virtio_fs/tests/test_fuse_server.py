"""The FUSE server driven through the protocol, with no kernel in between:
negotiation, the operations, the security rules and malformed requests."""
import errno
import os
import stat

import pytest

from fuseclient import Client, FuseError, errno_of, server_transport
from kvmkit_virtio_fs import fuse_proto as p
from kvmkit_virtio_fs.fuse_server import MAX_WRITE, FuseServer

ROOT = p.ROOT_ID


# -- INIT ---------------------------------------------------------------------------------------
def test_init_negotiates_down_to_our_minor_and_offers_only_known_flags(share):
    server = FuseServer(share)
    out = Client(server_transport(server)).init(minor=45, flags=0xFFFFFFFF)
    major, minor, readahead, flags, _, _, max_write, time_gran, max_pages, *_ = out
    assert (major, minor, readahead, max_write, max_pages) == (7, 37, 1 << 17, MAX_WRITE, 256)
    assert flags & p.DO_READDIRPLUS and flags & p.ATOMIC_O_TRUNC and flags & p.MAX_PAGES
    assert not flags & (p.WRITEBACK_CACHE | p.POSIX_LOCKS | p.FLOCK_LOCKS | p.POSIX_ACL
                        | p.EXPORT_SUPPORT | p.SETXATTR_EXT)
    server.close()


def test_init_keeps_an_older_clients_minor_and_flags_it_lacks(share):
    server = FuseServer(share)
    out = Client(server_transport(server)).init(minor=31, flags=p.ASYNC_READ)
    assert out[1] == 31 and out[3] == p.ASYNC_READ
    server.close()


def test_init_answers_a_newer_major_with_ours_and_refuses_ancient_minors(share):
    server = FuseServer(share)
    c = Client(server_transport(server))
    body = c.call(p.INIT, 0, p.INIT_IN.pack(8, 0, 0, 0))
    assert body == p.INIT_OUT.pack(7, 37, 0, 0, 0, 0, 0, 0, 0, 0, 0)[:8]
    assert c.raw(p.INIT, 0, p.INIT_IN.pack(7, 8, 0, 0))[0] == errno.EPROTO
    server.close()


def test_requests_before_init_fail(share):
    server = FuseServer(share)
    c = Client(server_transport(server))
    assert c.raw(p.GETATTR, ROOT, p.GETATTR_IN.pack(0, 0, 0))[0] == errno.EIO
    server.close()


# -- names and inodes ---------------------------------------------------------------------------
def test_node_ids_are_opaque_handles_not_host_inode_numbers(client, share):
    (share / "a").write_text("x")
    nodeid, attr = client.lookup(ROOT, b"a")
    assert attr[0] == os.stat(share / "a").st_ino          # st_ino is reported
    assert nodeid != attr[0] and nodeid == 2                # but the handle is our counter
    assert client.lookup(ROOT, b"a")[0] == nodeid           # same file, same id


def test_forged_and_forgotten_node_ids_are_stale(client, share):
    (share / "a").write_text("x")
    nodeid, attr = client.lookup(ROOT, b"a")
    for forged in (attr[0], nodeid + 1, 0, 2**64 - 1):
        assert errno_of(client.getattr, forged) == errno.ESTALE
    client.forget(nodeid, 1)
    assert errno_of(client.getattr, nodeid) == errno.ESTALE


def test_hard_links_share_one_node_id(client, share):
    (share / "a").write_text("x")
    os.link(share / "a", share / "b")
    assert client.lookup(ROOT, b"a")[0] == client.lookup(ROOT, b"b")[0]


def test_negative_lookup_is_a_cacheable_entry_in_auto_and_enoent_in_never(make_client, share):
    c, _ = make_client(cache="auto")
    nodeid, _ = c.lookup(ROOT, b"missing")
    assert nodeid == 0
    c, _ = make_client(cache="never")
    assert errno_of(c.lookup, ROOT, b"missing") == errno.ENOENT


@pytest.mark.parametrize("name", [b"..", b".", b"a/b", b"../../etc", b"/etc"])
def test_names_must_be_one_component(client, share, name):
    (share / "a").mkdir()
    (share / "a" / "b").write_text("x")
    assert errno_of(client.lookup, ROOT, name) == errno.EINVAL
    assert errno_of(client.mkdir, ROOT, name) == errno.EINVAL


def test_symlinks_are_never_followed_by_the_server(client, share, tmp_path):
    secret = tmp_path / "outside"
    secret.mkdir()
    (secret / "passwd").write_text("secret")
    os.symlink(secret, share / "esc")
    os.symlink(secret / "passwd", share / "escfile")
    esc, attr = client.lookup(ROOT, b"esc")
    assert stat.S_ISLNK(attr[9])
    assert errno_of(client.lookup, esc, b"passwd") == errno.ENOTDIR
    assert errno_of(client.opendir, esc) == errno.ENOTDIR
    escfile, _ = client.lookup(ROOT, b"escfile")
    assert errno_of(client.open, escfile) == errno.EACCES
    assert client.readlink(escfile) == os.fsencode(secret / "passwd")   # the target is data
    # creating through a symlink that points out does not write outside either
    assert errno_of(client.create, ROOT, b"escfile") == errno.ELOOP
    assert (secret / "passwd").read_text() == "secret"


def test_a_directory_moved_on_the_host_keeps_its_node_id(client, share):
    (share / "d").mkdir()
    d, _ = client.lookup(ROOT, b"d")
    os.rename(share / "d", share / "moved")
    nodeid, _ = client.create(d, b"f")
    assert (share / "moved" / "f").exists()


def test_inode_table_is_bounded(make_client, share):
    for i in range(20):
        (share / f"f{i}").write_text("")
    c, server = make_client(max_inodes=10)
    got = [errno_of(c.lookup, ROOT, f"f{i}".encode()) for i in range(20)]
    assert got.count(0) == 9 and set(got) == {0, errno.ENFILE}
    assert server.inode_count == 10


def test_handle_table_is_bounded(make_client, share):
    (share / "f").write_text("x")
    c, server = make_client(max_handles=4)
    f, _ = c.lookup(ROOT, b"f")
    fhs = [c.open(f) for _ in range(4)]
    assert errno_of(c.open, f) == errno.EMFILE
    assert errno_of(c.opendir, ROOT) == errno.EMFILE
    c.release(f, fhs[0])
    c.open(f)
    assert server.handle_count == 4


def test_forged_file_handles_are_ebadf(client, share):
    (share / "f").write_text("x")
    f, _ = client.lookup(ROOT, b"f")
    fh = client.open(f)
    assert errno_of(client.read, f, fh + 1, 0, 10) == errno.EBADF
    assert errno_of(client.readdir, ROOT, fh) == errno.EBADF     # a file handle is not a dir's


# -- data -------------------------------------------------------------------------------------------
def test_create_write_read_rename_unlink(client, share):
    d, _ = client.mkdir(ROOT, b"dir", 0o750)
    assert stat.S_IMODE(os.stat(share / "dir").st_mode) == 0o750
    f, fh = client.create(d, b"file", os.O_RDWR, 0o640)
    data = os.urandom(300_000)
    assert client.write(f, fh, 5, data) == len(data)
    assert client.read(f, fh, 5, len(data)) == data
    assert client.read(f, fh, 0, 5) == b"\0" * 5
    client.release(f, fh)
    assert (share / "dir" / "file").read_bytes() == b"\0" * 5 + data
    client.rename(d, b"file", ROOT, b"moved")
    assert (share / "moved").exists() and not (share / "dir" / "file").exists()
    client.unlink(ROOT, b"moved")
    assert not (share / "moved").exists()


def test_read_is_capped_at_max_write(client, share):
    (share / "big").write_bytes(b"z" * (MAX_WRITE + 4096))
    f, _ = client.lookup(ROOT, b"big")
    fh = client.open(f)
    assert len(client.read(f, fh, 0, 0xFFFFFFFF)) == MAX_WRITE


def test_readdir_pages_through_a_large_directory_and_plus_counts_lookups(make_client, share):
    names = {f"entry-{i:04d}-{'x' * (i % 50)}".encode() for i in range(700)}
    for n in names:
        (share / n.decode()).write_text("")
    c, server = make_client()
    assert set(c.listdir(ROOT, size=4096)) == names | {b".", b".."}
    listed = c.listdir(ROOT, plus=True, size=4096)
    assert set(listed) == names | {b".", b".."} and len(listed) == len(names) + 2
    assert server.inode_count == len(names) + 1                 # root + one per entry


def test_rename_exchange_and_noreplace(client, share):
    (share / "a").write_text("A")
    (share / "b").write_text("B")
    client.rename(ROOT, b"a", ROOT, b"b", flags=2)
    assert (share / "a").read_text() == "B" and (share / "b").read_text() == "A"
    assert errno_of(client.rename, ROOT, b"a", ROOT, b"b", 1) == errno.EEXIST


def test_mknod_makes_fifos_but_never_device_nodes(client, share):
    args = p.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + b"fifo\0"
    client.call(p.MKNOD, ROOT, args)
    assert stat.S_ISFIFO(os.lstat(share / "fifo").st_mode)
    dev = p.MKNOD_IN.pack(stat.S_IFBLK | 0o600, (8 << 8), 0, 0) + b"sda\0"
    assert client.raw(p.MKNOD, ROOT, dev)[0] == errno.EPERM
    fifo, _ = client.lookup(ROOT, b"fifo")
    assert errno_of(client.open, fifo) == errno.EACCES         # only regular files are opened


def test_setattr_size_mode_times(client, share):
    (share / "f").write_bytes(b"0123456789")
    f, _ = client.lookup(ROOT, b"f")
    args = p.SETATTR_IN.pack(p.FATTR_SIZE | p.FATTR_MODE | p.FATTR_MTIME, 0, 0, 4, 0, 0,
                             1_000_000_000, 0, 0, 5, 0, 0o600, 0, 0, 0, 0)
    attr = p.ATTR.unpack_from(client.call(p.SETATTR, f, args), p.ATTR_OUT_HEAD.size)
    st = os.stat(share / "f")
    assert (st.st_size, stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (4, 0o600, 10**18 + 5)
    assert (attr[1], attr[4], attr[7]) == (4, 1_000_000_000, 5)


def test_xattrs_only_when_enabled_and_only_user_namespace(make_client, share):
    (share / "f").write_text("")
    c, _ = make_client()
    f, _ = c.lookup(ROOT, b"f")
    assert c.raw(p.GETXATTR, f, p.GETXATTR_IN.pack(0, 0) + b"user.a\0")[0] == errno.ENOSYS
    c, _ = make_client(xattr=True)
    f, _ = c.lookup(ROOT, b"f")
    c.call(p.SETXATTR, f, p.SETXATTR_IN_COMPAT.pack(3, 0) + b"user.a\0" + b"val")
    assert os.getxattr(share / "f", "user.a") == b"val"
    assert c.call(p.GETXATTR, f, p.GETXATTR_IN.pack(0, 0) + b"user.a\0") == \
        p.GETXATTR_OUT.pack(3, 0)
    assert c.call(p.GETXATTR, f, p.GETXATTR_IN.pack(10, 0) + b"user.a\0") == b"val"
    assert c.raw(p.GETXATTR, f, p.GETXATTR_IN.pack(1, 0) + b"user.a\0")[0] == errno.ERANGE
    assert c.call(p.LISTXATTR, f, p.GETXATTR_IN.pack(100, 0)) == b"user.a\0"
    bad = p.SETXATTR_IN_COMPAT.pack(1, 0) + b"security.capability\0" + b"x"
    assert c.raw(p.SETXATTR, f, bad)[0] == errno.EOPNOTSUPP
    c.call(p.REMOVEXATTR, f, b"user.a\0")
    assert os.listxattr(share / "f") == []


def test_lseek_fallocate_copy_file_range(client, share):
    f, fh = client.create(ROOT, b"f")
    client.call(p.FALLOCATE, f, p.FALLOCATE_IN.pack(fh, 0, 8192, 0, 0))
    assert os.stat(share / "f").st_size == 8192
    client.write(f, fh, 1 << 20, b"tail")
    fd = os.open(share / "f", os.O_RDONLY)
    for whence in (os.SEEK_DATA, os.SEEK_HOLE):         # the same answer as the host file's
        off = p.LSEEK_OUT.unpack(client.call(p.LSEEK, f, p.LSEEK_IN.pack(fh, 0, whence, 0)))[0]
        assert off == os.lseek(fd, 0, whence)
    os.close(fd)
    g, gh = client.create(ROOT, b"g")
    n = p.WRITE_OUT.unpack(client.call(p.COPY_FILE_RANGE, f, p.COPY_FILE_RANGE_IN.pack(
        fh, 1 << 20, g, gh, 0, 4, 0)))[0]
    assert n == 4 and (share / "g").read_bytes() == b"tail"


def test_access_checks_mode_bits_for_the_caller(make_client, share):
    (share / "f").write_text("")
    os.chmod(share / "f", 0o640)
    c, _ = make_client()
    f, _ = c.lookup(ROOT, b"f")
    acc = lambda mask: c.raw(p.ACCESS, f, p.ACCESS_IN.pack(mask, 0))[0]  # noqa: E731
    assert acc(os.R_OK | os.W_OK) == 0 and acc(os.X_OK) == errno.EACCES      # uid 0
    c.uid, c.gid = 1000, 1000
    assert acc(os.R_OK) == errno.EACCES and acc(os.F_OK) == 0


def test_statfs(client, share):
    body = client.call(p.STATFS, ROOT)
    blocks, *_, bsize, namelen, frsize, _ = p.KSTATFS.unpack(body)
    assert blocks == os.statvfs(share).f_blocks and namelen == 255


# -- readonly ---------------------------------------------------------------------------------------
MUTATIONS = [
    (p.MKDIR, p.MKDIR_IN.pack(0o755, 0) + b"new\0"),
    (p.CREATE, p.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"new\0"),
    (p.MKNOD, p.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0, 0) + b"new\0"),
    (p.SYMLINK, b"new\0target\0"),
    (p.UNLINK, b"f\0"),
    (p.RMDIR, b"d\0"),
    (p.RENAME, p.RENAME_IN.pack(ROOT) + b"f\0g\0"),
    (p.RENAME2, p.RENAME2_IN.pack(ROOT, 0, 0) + b"f\0g\0"),
    (p.LINK, p.LINK_IN.pack(2) + b"g\0"),
    (p.SETATTR, p.SETATTR_IN.pack(p.FATTR_SIZE, 0, 0, 0, *([0] * 12))),
    (p.SETXATTR, p.SETXATTR_IN_COMPAT.pack(1, 0) + b"user.a\0x"),
    (p.REMOVEXATTR, b"user.a\0"),
    (p.WRITE, p.WRITE_IN.pack(1, 0, 1, 0, 0, 0, 0) + b"x"),
    (p.FALLOCATE, p.FALLOCATE_IN.pack(1, 0, 10, 0, 0)),
    (p.COPY_FILE_RANGE, p.COPY_FILE_RANGE_IN.pack(1, 0, 2, 1, 0, 1, 0)),
]


@pytest.mark.parametrize("opcode, args", MUTATIONS, ids=[p.OPCODE_NAMES[o] for o, _ in MUTATIONS])
def test_readonly_refuses_every_mutation(make_client, share, opcode, args):
    (share / "f").write_text("keep")
    (share / "d").mkdir()
    before = sorted(os.listdir(share))
    c, _ = make_client(readonly=True, xattr=True)
    f, _ = c.lookup(ROOT, b"f")                 # node id 2, as the LINK case names
    target = f if opcode in (p.SETATTR, p.WRITE, p.FALLOCATE, p.COPY_FILE_RANGE) else ROOT
    assert c.raw(opcode, target, args)[0] == errno.EROFS
    assert sorted(os.listdir(share)) == before and (share / "f").read_text() == "keep"


def test_readonly_refuses_opening_for_write_or_truncate(make_client, share):
    (share / "f").write_text("keep")
    c, _ = make_client(readonly=True)
    f, _ = c.lookup(ROOT, b"f")
    for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
        assert errno_of(c.open, f, flags) == errno.EROFS
    assert c.read(f, c.open(f), 0, 10) == b"keep"


# -- malformed requests -----------------------------------------------------------------------------
def test_short_and_lying_requests_get_error_replies(client, share):
    server = client.send.__closure__[0].cell_contents
    assert bytes(server.handle(b"\x01\x02")) == p.out_header(0, errno.EINVAL, 0)
    hdr = p.IN_HEADER.pack(100, p.GETATTR, 77, ROOT, 0, 0, 0, 0, 0)       # says 100, has 40
    assert bytes(server.handle(hdr)) == p.out_header(77, errno.EINVAL, 0)
    assert client.raw(p.LOOKUP, ROOT, b"no-nul")[0] == errno.EINVAL
    assert client.raw(p.LOOKUP, ROOT, b"x" * 300 + b"\0")[0] == errno.ENAMETOOLONG
    assert client.raw(p.READ, ROOT, b"\0" * 8)[0] == errno.EINVAL
    assert client.raw(p.SETUPMAPPING, ROOT, b"")[0] == errno.ENOSYS
    assert client.raw(9999, ROOT, b"")[0] == errno.ENOSYS
    big = p.WRITE_IN.pack(1, 0, MAX_WRITE + 1, 0, 0, 0, 0)
    assert client.raw(p.WRITE, ROOT, big)[0] == errno.EINVAL
