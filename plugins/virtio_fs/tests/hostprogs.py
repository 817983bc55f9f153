"""Programs the host-mount tests run in child processes (python3 hostprogs.py
CMD ...), so the kernel's FUSE client, not this process, makes the calls."""
import errno
import hashlib
import os
import random
import sys


def fsx(path: str, seed: int, ops: int, maxlen: int = 1 << 18) -> None:
    """Random writes, reads, truncates, fallocates, copies and appends on
    ``path``, checked against a shadow copy in memory after every read; ends
    by printing the sha256 of the file."""
    rng = random.Random(seed)
    shadow = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    for i in range(ops):
        op = rng.randrange(10)
        off = rng.randrange(maxlen)
        n = rng.randrange(1, 1 << rng.choice((4, 9, 13, 17)))
        if op <= 3:                                           # write
            data = rng.randbytes(n)
            assert os.pwrite(fd, data, off) == n
            if off > len(shadow):
                shadow += bytes(off - len(shadow))
            shadow[off:off + n] = data
        elif op <= 6:                                         # read and check
            got = os.pread(fd, n, off)
            want = bytes(shadow[off:off + n])
            if got != want:
                sys.exit(f"op {i}: read {n} at {off}: {len(got)} bytes differ from the shadow")
        elif op == 7:                                         # truncate
            size = rng.randrange(maxlen)
            os.ftruncate(fd, size)
            shadow = shadow[:size] + bytes(max(0, size - len(shadow)))
        elif op == 8:                                         # fallocate (keep size) / extend
            os.posix_fallocate(fd, off, n)
            if off + n > len(shadow):
                shadow += bytes(off + n - len(shadow))
        else:                                                 # copy a range within the file
            src = rng.randrange(max(1, len(shadow)))
            n = min(n, len(shadow) - src)
            if n > 0:
                done = os.copy_file_range(fd, fd, n, src, off) if abs(src - off) >= n else 0
                if done:
                    chunk = bytes(shadow[src:src + done])
                    if off > len(shadow):
                        shadow += bytes(off - len(shadow))
                    shadow[off:off + done] = chunk
        if os.fstat(fd).st_size != len(shadow):
            sys.exit(f"op {i} ({op}): size {os.fstat(fd).st_size}, shadow {len(shadow)}")
    os.close(fd)
    with open(path, "rb") as f:
        data = f.read()
    if data != bytes(shadow):
        sys.exit("final contents differ from the shadow")
    print(hashlib.sha256(data).hexdigest())


def race(root: str, worker: int, rounds: int) -> None:
    """Rename, link and unlink shared names in ``root`` against other
    workers; only ENOENT/EEXIST (a lost race) is an acceptable failure."""
    rng = random.Random(worker)
    names = [f"n{i}" for i in range(8)]
    lost = 0
    for _ in range(rounds):
        a, b = rng.sample(names, 2)
        op = rng.randrange(5)
        try:
            if op == 0:
                with open(os.path.join(root, a), "w") as f:
                    f.write(f"{worker}:{a}")
            elif op == 1:
                os.rename(os.path.join(root, a), os.path.join(root, b))
            elif op == 2:
                os.link(os.path.join(root, a), os.path.join(root, b))
            elif op == 3:
                os.unlink(os.path.join(root, a))
            else:
                with open(os.path.join(root, a)) as f:
                    f.read()
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.EEXIST):
                raise
            lost += 1
    print(lost)


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "fsx":
        fsx(args[0], int(args[1]), int(args[2]))
    elif cmd == "race":
        race(args[0], int(args[1]), int(args[2]))
