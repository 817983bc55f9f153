"""The FUSE server mounted on the host through /dev/fuse and exercised by
real programs (cp, tar, git, racing processes, an fsx-style random I/O
checker) that the host kernel's FUSE client turns into requests; every
result is compared with the same work on a plain directory."""
import errno
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).parent
REPO = HERE.parents[2]
PROGS = str(HERE / "hostprogs.py")


def run(cmd, cwd=None, check=True, **kw):
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=240, **kw)
    if check and r.returncode:
        raise AssertionError(f"{cmd} failed ({r.returncode}): {r.stderr[-2000:]}")
    return r


def snapshot(root: Path, times: bool = True) -> dict:
    """What a tree holds: per path, its type, permission bits, size, content
    hash or link target, and (optionally) mtime."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                what = ("link", os.readlink(path))
            elif stat.S_ISREG(st.st_mode):
                what = ("file", hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size)
            else:
                what = ("dir",)
            out[rel] = what + (stat.S_IMODE(st.st_mode),) + ((st.st_mtime_ns,) if times
                                                           and not stat.S_ISDIR(st.st_mode) else ())
    return out


def source_tree(dst: Path) -> Path:
    """A small source tree: the repository's core/ (no caches) and a few
    symlinks, a hard link, an empty dir and odd modes."""
    shutil.copytree(REPO / "core", dst, ignore=shutil.ignore_patterns("__pycache__", "*.so"),
                    symlinks=True)
    os.symlink("cli.py", dst / "link-to-cli")
    os.symlink("/nonexistent/absolute", dst / "dangling")
    os.link(dst / "bus.py", dst / "bus-hardlink.py")
    (dst / "empty").mkdir()
    os.chmod(dst / "vcpu.py", 0o600)
    (dst / "script.sh").write_text("#!/bin/sh\necho hi\n")
    os.chmod(dst / "script.sh", 0o755)
    return dst


@pytest.fixture
def src(tmp_path):
    return source_tree(tmp_path / "src")


@pytest.fixture
def share_and_plain(tmp_path, mount):
    share, plain = tmp_path / "share", tmp_path / "plain"
    share.mkdir()
    plain.mkdir()
    mnt, server = mount(share)
    return mnt, share, plain, server


def test_cp_a_of_a_source_tree(src, share_and_plain):
    mnt, share, plain, server = share_and_plain
    run(["cp", "-a", str(src), str(mnt / "tree")])
    run(["cp", "-a", str(src), str(plain / "tree")])
    want = snapshot(plain / "tree")
    assert len(want) > 50
    assert snapshot(mnt / "tree") == want                  # as the client sees it
    assert snapshot(share / "tree") == want                # and as it landed on the host
    assert (share / "tree" / "bus.py").stat().st_ino == \
        (share / "tree" / "bus-hardlink.py").stat().st_ino
    assert run(["diff", "-r", "--no-dereference", str(src), str(mnt / "tree")]).returncode == 0
    assert server.failures == 0


def test_tar_round_trip(src, share_and_plain, tmp_path):
    mnt, share, plain, _ = share_and_plain
    run(["tar", "-C", str(src), "-cf", str(tmp_path / "in.tar"), "."])
    run(["tar", "-C", str(mnt), "-xpf", str(tmp_path / "in.tar")])       # extract onto FUSE
    run(["tar", "-C", str(plain), "-xpf", str(tmp_path / "in.tar")])
    assert snapshot(mnt) == snapshot(plain)
    run(["tar", "-C", str(mnt), "-cf", str(tmp_path / "out.tar"), "."])  # and archive from it
    back = tmp_path / "back"
    back.mkdir()
    run(["tar", "-C", str(back), "-xpf", str(tmp_path / "out.tar")])
    assert snapshot(back) == snapshot(plain)
    listing = lambda t: sorted(run(["tar", "-tvf", str(t)]).stdout.splitlines())  # noqa: E731
    assert listing(tmp_path / "out.tar") == listing(tmp_path / "in.tar")


def test_git_init_commit_status(src, share_and_plain):
    mnt, share, plain, server = share_and_plain
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@e", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@e", GIT_AUTHOR_DATE="2026-01-01T00:00:00Z",
               GIT_COMMITTER_DATE="2026-01-01T00:00:00Z", HOME=str(plain.parent))
    trees = {}
    for where in (mnt, plain):
        repo = where / "repo"
        shutil.copytree(src, repo, symlinks=True)
        run(["git", "init", "-q"], cwd=repo, env=env)
        run(["git", "add", "-A"], cwd=repo, env=env)
        run(["git", "commit", "-qm", "first"], cwd=repo, env=env)
        (repo / "bus.py").write_text("changed\n")
        (repo / "new-file").write_text("new\n")
        os.unlink(repo / "cli.py")
        status = run(["git", "status", "--porcelain"], cwd=repo, env=env).stdout
        run(["git", "commit", "-qam", "second"], cwd=repo, env=env)
        run(["git", "fsck", "--strict"], cwd=repo, env=env)
        trees[where] = (status, run(["git", "rev-parse", "HEAD", "HEAD^{tree}"], cwd=repo,
                                    env=env).stdout,
                        run(["git", "status", "--porcelain"], cwd=repo, env=env).stdout)
    assert trees[mnt] == trees[plain]
    assert trees[mnt][0].split("\n")[:3] == [" M bus.py", " D cli.py", "?? new-file"]
    assert server.failures == 0


def test_rename_link_unlink_races(share_and_plain):
    mnt, share, plain, server = share_and_plain
    workers = [subprocess.Popen([sys.executable, PROGS, "race", str(mnt), str(i), "400"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for i in range(4)]
    for w in workers:
        out, err = w.communicate(timeout=240)
        assert w.returncode == 0, err
    # the client's view and the host's agree afterwards, name by name and byte by byte
    names = sorted(os.listdir(mnt))
    assert names == sorted(os.listdir(share))
    for n in names:
        assert (mnt / n).read_bytes() == (share / n).read_bytes()
        assert os.stat(mnt / n).st_nlink == os.stat(share / n).st_nlink
    assert server.failures == 0


def test_fsx_random_io_matches_a_shadow_and_the_plain_directory(share_and_plain):
    mnt, share, plain, server = share_and_plain
    sums = []
    for where in (mnt, plain):
        r = run([sys.executable, PROGS, "fsx", str(where / "fsx.dat"), "1234", "3000"])
        sums.append(r.stdout.strip())
    assert sums[0] == sums[1] and len(sums[0]) == 64
    assert (share / "fsx.dat").read_bytes() == (plain / "fsx.dat").read_bytes()


def test_readonly_share_refuses_every_change(src, tmp_path, mount):
    share = tmp_path / "ro"
    shutil.copytree(src, share, symlinks=True)
    before = snapshot(share)
    mnt, server = mount(share, readonly=True)
    assert snapshot(mnt) == before                         # reading works
    attempts = [["touch", "new"], ["mkdir", "d"], ["rm", "bus.py"], ["mv", "bus.py", "x"],
                ["ln", "bus.py", "hl"], ["ln", "-s", "bus.py", "sl"], ["chmod", "777", "bus.py"],
                ["truncate", "-s", "0", "bus.py"], ["rmdir", "empty"], ["touch", "bus.py"],
                ["sh", "-c", "echo x >> bus.py"], ["cp", "bus.py", "copy"]]
    for cmd in attempts:
        r = run(cmd, cwd=mnt, check=False)
        assert r.returncode != 0 and "Read-only file system" in r.stderr, (cmd, r.stderr)
    assert snapshot(share) == before


def test_cache_never_sees_host_changes_at_once(tmp_path, mount):
    share = tmp_path / "s"
    share.mkdir()
    (share / "f").write_text("one")
    mnt, _ = mount(share, cache="never")
    assert (mnt / "f").read_text() == "one"
    (share / "f").write_text("two!")
    (share / "g").write_text("new")
    assert (mnt / "f").read_text() == "two!" and (mnt / "g").read_text() == "new"
    os.unlink(share / "g")
    assert not (mnt / "g").exists()


def test_host_symlinks_to_outside_are_links_not_doors(tmp_path, mount):
    """A symlink in the share pointing outside is followed by the *client*
    (on the host that is the host namespace); the server itself hands out the
    link, never the target: its stat is a symlink's and it cannot be opened
    through the server without the client resolving it."""
    share, outside = tmp_path / "s", tmp_path / "outside"
    share.mkdir()
    outside.mkdir()
    (outside / "secret").write_text("x")
    os.symlink(outside, share / "door")
    mnt, server = mount(share)
    assert stat.S_ISLNK(os.lstat(mnt / "door").st_mode)
    assert os.readlink(mnt / "door") == str(outside)
    assert server.inode_count == 2                          # root + the link, nothing outside


def test_close_unmounts_even_with_a_busy_mount(tmp_path, mount):
    share = tmp_path / "s"
    share.mkdir()
    (share / "f").write_text("x")
    mnt, server = mount(share)
    holder = subprocess.Popen(["sleep", "60"], cwd=mnt)         # keeps the mount busy
    try:
        from kvmkit_virtio_fs.fuse_dev import FuseMount
        m = FuseMount(server, mnt)                                # a second, stacked mount
        m.start()
        start = time.monotonic()
        m.close()
        assert time.monotonic() - start < 5
        assert str(mnt) in open("/proc/mounts").read()             # the fixture's is still up
    finally:
        holder.kill()
        holder.wait()
