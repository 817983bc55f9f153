#!/usr/bin/env python3
"""The virtio-fs FUSE server through the host kernel's /dev/fuse, against the
plain directory it serves.

The server (kvmkit_virtio_fs.fuse_server, the code the virtio-fs device runs)
is mounted on the host with kvmkit_virtio_fs.fuse_dev and serves on a thread
of this process; every workload runs in a child process (so this process's
GIL is the server's alone), once on the plain directory and once through the
mount, and the ratio (FUSE time / plain time) is printed.  What the guest
adds on top (virtqueue, guest kernel) is not in these numbers: they are the
server's cost per request as a real FUSE client drives it.

Workloads (files on the same host file system, its page cache warm, so the
numbers are CPU cost per request, not disk speed):

* sequential write: SIZE MiB in 1 MiB writes, then fsync;
* sequential read: the same file read in 1 MiB reads on a fresh mount (the
  FUSE client's page cache cold, the host's warm);
* 4 KiB random reads: COUNT preads at random 4 KiB-aligned offsets, mount
  with cache = "never" (each read is one READ request);
* stat of FILES files: a fresh mount, every name stat'ed once (LOOKUP each);
* untar: a tar of a source tree (a part of Debian's linux-source-6.1 when
  /usr/src has it, else the Python standard library) extracted.

Needs root (mount(2)) and /dev/fuse.

    sudo .venv/bin/python bench/virtio_fs.py [--size 256] [--count 20000] [--files 10000]
                                             [--tree-files 8000] [--dir /var/tmp] [--quick]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from kvmkit_virtio_fs.fuse_dev import FuseMount, MountError
from kvmkit_virtio_fs.fuse_server import FuseServer
from kvmkit_virtio_fs.hostfs import raise_fd_limit

from machine_info import describe  # bench/ is on sys.path when run as a script

# Each workload times itself (interpreter start-up left out) and prints seconds.
SEQ_WRITE = """
import os, sys, time
path, mib = sys.argv[1], int(sys.argv[2])
block = os.urandom(1 << 20)
t0 = time.perf_counter()
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
for _ in range(mib):
    os.write(fd, block)
os.fsync(fd)
os.close(fd)
print(time.perf_counter() - t0)
"""
SEQ_READ = """
import os, sys, time
t0 = time.perf_counter()
fd = os.open(sys.argv[1], os.O_RDONLY)
total = 0
while (n := len(os.read(fd, 1 << 20))):
    total += n
assert total == int(sys.argv[2]) << 20, total
print(time.perf_counter() - t0)
"""
RAND_READ = """
import os, random, sys, time
path, count = sys.argv[1], int(sys.argv[2])
t0 = time.perf_counter()
fd = os.open(path, os.O_RDONLY)
blocks = os.fstat(fd).st_size // 4096
rng = random.Random(1)
for _ in range(count):
    assert len(os.pread(fd, 4096, rng.randrange(blocks) * 4096)) == 4096
print(time.perf_counter() - t0)
"""
STAT = """
import os, sys, time
d = sys.argv[1]
t0 = time.perf_counter()
for i in range(int(sys.argv[2])):
    os.stat(f"{d}/f{i:05d}")
print(time.perf_counter() - t0)
"""


def timed(argv: list[str]) -> float:
    """Seconds the workload took: what a Python workload printed (its own
    timing), else the wall time of the command."""
    t0 = time.perf_counter()
    r = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    try:
        return float(r.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return wall


def py(script: str, *args) -> list[str]:
    return [sys.executable, "-c", script, *map(str, args)]


def source_tarball(work: Path, files: int) -> Path:
    """An uncompressed tar of about ``files`` files of a real source tree."""
    out = work / "tree.tar"
    src = Path("/usr/src/linux-source-6.1.tar.xz")
    if src.exists():
        with tarfile.open(src) as tin, tarfile.open(out, "w") as tout:
            n = 0
            for member in tin:
                if n >= files:
                    break
                if member.isfile():
                    tout.addfile(member, tin.extractfile(member))
                    n += 1
                elif member.isdir() or member.issym():
                    tout.addfile(member)
        return out
    stdlib = Path(os.__file__).parent
    with tarfile.open(out, "w") as tout:
        n = 0
        for path in sorted(stdlib.rglob("*")):
            if n >= files:
                break
            if path.is_file() and not path.is_symlink():
                tout.add(path, arcname=str(path.relative_to(stdlib.parent)))
                n += 1
    return out


class Mounted:
    def __init__(self, root: Path, mnt: Path, **kw):
        self.server = FuseServer(root, **kw)
        self.mount = FuseMount(self.server, mnt)

    def __enter__(self):
        self.mount.start()
        return self

    def __exit__(self, *exc):
        self.mount.close()
        self.server.close()


def run(args) -> list[tuple[str, float, float, str]]:
    work = Path(tempfile.mkdtemp(prefix="kvmkit-fs-bench-", dir=args.dir))
    plain, mnt = work / "plain", work / "mnt"
    plain.mkdir()
    mnt.mkdir()
    rows = []
    try:
        size = args.size
        # sequential write, then read back on a fresh mount
        t_plain = timed(py(SEQ_WRITE, plain / "seq.dat", size))
        with Mounted(plain, mnt):
            t_fuse = timed(py(SEQ_WRITE, mnt / "seq2.dat", size))
        rows.append((f"sequential write, {size} MiB in 1 MiB writes + fsync", t_plain, t_fuse,
                     f"{size / t_fuse:.0f} MiB/s"))
        t_plain = timed(py(SEQ_READ, plain / "seq.dat", size))
        with Mounted(plain, mnt):
            t_fuse = timed(py(SEQ_READ, mnt / "seq.dat", size))
        rows.append((f"sequential read, {size} MiB in 1 MiB reads", t_plain, t_fuse,
                     f"{size / t_fuse:.0f} MiB/s"))
        # 4 KiB random reads, every one a request
        t_plain = timed(py(RAND_READ, plain / "seq.dat", args.count))
        with Mounted(plain, mnt, cache="never"):
            t_fuse = timed(py(RAND_READ, mnt / "seq.dat", args.count))
        rows.append((f"4 KiB random reads x {args.count} (cache=never)", t_plain, t_fuse,
                     f"{args.count / t_fuse:.0f} reads/s"))
        # stat of many files on a fresh mount
        files = plain / "many"
        files.mkdir()
        for i in range(args.files):
            (files / f"f{i:05d}").write_bytes(b"")
        t_plain = timed(py(STAT, files, args.files))
        with Mounted(plain, mnt):
            t_fuse = timed(py(STAT, mnt / "many", args.files))
        rows.append((f"stat of {args.files} files (fresh mount: a LOOKUP each)", t_plain, t_fuse,
                     f"{args.files / t_fuse:.0f} stats/s"))
        # untar a source tree
        tar = source_tarball(work, args.tree_files)
        with tarfile.open(tar) as t:
            members = sum(1 for _ in t)
        (plain / "untar").mkdir()
        t_plain = timed(["tar", "-C", str(plain / "untar"), "-xf", str(tar)])
        shutil.rmtree(plain / "untar")
        (plain / "untar2").mkdir()
        with Mounted(plain, mnt, max_inodes=2 * members + 1024):
            t_fuse = timed(["tar", "-C", str(mnt / "untar2"), "-xf", str(tar)])
        rows.append((f"untar {members} entries ({tar.stat().st_size >> 20} MiB)", t_plain, t_fuse,
                     f"{members / t_fuse:.0f} entries/s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=256, help="MiB for the sequential cases")
    ap.add_argument("--count", type=int, default=20000, help="4 KiB random reads")
    ap.add_argument("--files", type=int, default=10000, help="files to stat")
    ap.add_argument("--tree-files", type=int, default=8000,
                    help="files in the untar case (each needs an open descriptor in the server)")
    ap.add_argument("--dir", default="/var/tmp", help="where the plain directory lives")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.count, args.files, args.tree_files = 8, 500, 300, 200
    print(describe())
    raise_fd_limit(4 * args.tree_files + 65536)     # an O_PATH descriptor per inode
    try:
        rows = run(args)
    except MountError as e:
        print(f"bench/virtio_fs.py: {e}", file=sys.stderr)
        return 2
    print(f"\n| workload | plain | FUSE server | ratio | FUSE rate |\n| --- | --- | --- | --- | --- |")
    for name, t_plain, t_fuse, rate in rows:
        print(f"| {name} | {t_plain * 1000:.0f} ms | {t_fuse * 1000:.0f} ms | "
              f"{t_fuse / t_plain:.1f}x | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
