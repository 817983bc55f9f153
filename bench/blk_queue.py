#!/usr/bin/env python3
"""virtio-blk through the Python queue and the native queue, against raw system calls.

The harness plays the guest driver with kvmkit's virtqueue driver model: a
GuestMemory (an anonymous mapping, as in a VM), a VirtioBlk on a temporary
raw image on disk, requests written into guest memory (header, data buffer,
status byte; one indirect descriptor each, EVENT_IDX on, as Linux drives
it).  Only the device side is timed; the driver model's own Python work
stands in for the guest kernel's and is left out:

* python: ``process(0)`` and ``should_notify()`` as the transport's notify
  path calls them, on the pure-Python SplitQueue;
* native: kvmkit-native's C engine on its own thread, timed two ways: the
  engine's own busy time (its ``busy_ns`` counter: pop, I/O, used ring,
  interrupt; the same span the python path times), and wall time from the
  write to the queue's kick eventfd until the engine's interrupt eventfd
  says every request is done (used_event asks for one interrupt per batch),
  which adds waking two threads once per notification;
* raw: a C loop of pread/pwrite (bench/raw_io.py) on the same file, block
  sizes and offsets, one request at a time, cycling through as many buffers
  as the queue has requests in flight (the same memory footprint).

The image is written in full before the runs, so reads come from the host
page cache (cache = writeback): the numbers are the per-request CPU cost of
each path, not the disk's speed.  ``--cache none`` runs both paths O_DIRECT.

    .venv/bin/python bench/blk_queue.py [--seconds 5] [--size 256M] [--depth 32]
                                        [--dir /var/tmp] [--cache writeback|none]
"""
from __future__ import annotations

import argparse
import mmap
import os
import random
import tempfile
import time

from kvmkit.memory import GuestMemory
from kvmkit.testing import EngineHost
from kvmkit.plugin_api import Size
from kvmkit.virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                                  VIRTIO_F_VERSION_1)
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.backends import resolve
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.backend import FileBackend
from kvmkit_virtio_blk.blk import QUEUE_SIZE, VirtioBlk

from machine_info import describe  # bench/ is on sys.path when run as a script
from raw_io import load as load_raw_io

CASES = (                       # name, block size, random offsets?, write?
    ("4K random read", 4096, True, False),
    ("4K random write", 4096, True, True),
    ("64K sequential read", 65536, False, False),
    ("64K sequential write", 65536, False, True),
)
GUEST_RAM = 64 << 20


def filesystem_of(path: str) -> str:
    best, fstype = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, typ, *_ = line.split()
                if path.startswith(mnt) and len(mnt) > len(best):
                    best, fstype = mnt, typ
    except OSError:
        pass
    return f"{fstype} (mounted at {best or '?'})"


def make_image(directory: str, size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="kvmkit-bench-", suffix=".img", dir=directory)
    chunk = random.Random(1).randbytes(1 << 20)
    try:
        for off in range(0, size, len(chunk)):
            os.pwrite(fd, chunk[:min(len(chunk), size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def offsets(size: int, bs: int, rand: bool, seed: int):
    """An endless sequence of block-aligned offsets inside the image."""
    blocks = size // bs
    rng = random.Random(seed)
    i = 0
    while True:
        yield (rng.randrange(blocks) if rand else i % blocks) * bs
        i += 1


class QueueRig:
    """The guest side: ``depth`` request slots in guest memory, each a header,
    a data buffer and a status byte named by one indirect descriptor."""

    def __init__(self, dev: VirtioBlk, depth: int, bs: int, queues: str):
        self.mem = GuestMemory(GUEST_RAM)
        rings = GuestAllocator(self.mem, 0x1000, 0x100000)
        self.alloc = GuestAllocator(self.mem, 0x100000)
        self.drv = DriverQueue(self.mem, QUEUE_SIZE, rings, indirect_max=4, event_idx=True)
        backend = resolve(queues, f"--queues {queues}")
        self.host = EngineHost() if queues == "native" else None
        dev.queue_backend, dev.host = backend, self.host
        self.queue = backend.split_queue(self.mem, QUEUE_SIZE, *self.drv.addresses,
                                         event_idx=True, indirect=True)
        features = (dev.features | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX)
                    | (1 << VIRTIO_F_RING_INDIRECT_DESC))
        dev.activate([self.queue], features)
        self.dev = dev
        self.bs = bs
        self.wall = 0.0                     # native: kick -> all used, summed
        self.engine_busy = 0.0              # native: the engine's busy_ns as last read
        # Data buffers are page-aligned, as a Linux guest's bio pages are.
        self.slots = [(self.alloc.alloc(16, 16), self.alloc.alloc(bs, 4096),
                       self.alloc.alloc(1, 1)) for _ in range(depth)]

    def batch(self, kind: int, offs) -> float:
        """Submit one request per slot, notify, reap; returns the device's time."""
        mem, drv = self.mem, self.drv
        for hdr, data, status in self.slots:
            mem.write(hdr, p.HEADER.pack(kind, 0, next(offs) // p.SECTOR))
            if kind == p.T_OUT:
                drv.add([(hdr, 16), (data, self.bs)], [(status, 1)], indirect=True, publish=False)
            else:
                drv.add([(hdr, 16)], [(data, self.bs), (status, 1)], indirect=True, publish=False)
        drv.kick()
        if self.host is not None:
            self.wall += self.host.run_batch(drv)
            busy = self.dev.engine.stats()["busy_ns"] / 1e9
            elapsed, self.engine_busy = busy - self.engine_busy, busy
        else:
            t0 = time.perf_counter()
            self.dev.process(0)                 # what the transport's notify() does
            self.queue.should_notify()
            elapsed = time.perf_counter() - t0
        used = drv.used()
        if len(used) != len(self.slots):
            raise RuntimeError(f"{len(used)} of {len(self.slots)} requests completed")
        for _, _, status in self.slots:
            if mem.read(status, 1) != b"\0":
                raise RuntimeError("a request failed")
        return elapsed


def run_queue(path: str, size: int, bs: int, rand: bool, write: bool, depth: int,
              seconds: float, direct: bool, queues: str, poll_us: int = 0) -> tuple[int, float, float, float]:
    """(requests, device-side seconds, wall seconds from kick to done, engine
    seconds spent polling)."""
    dev = VirtioBlk(FileBackend(path, direct=direct), serial="bench", poll_us=poll_us)
    rig = None
    try:
        rig = QueueRig(dev, depth, bs, queues)
        offs = offsets(size, bs, rand, seed=bs + write)
        kind = p.T_OUT if write else p.T_IN
        rig.batch(kind, offs)                                   # warm up
        rig.wall = 0.0
        requests, busy = 0, 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            busy += rig.batch(kind, offs)
            requests += depth
        if queues == "native" and dev.engine is None:
            raise RuntimeError("the native engine did not start")
        polled = dev.engine.stats()["poll_ns"] / 1e9 if dev.engine is not None else 0.0
        return requests, busy, rig.wall or busy, polled
    finally:
        dev.close()
        if rig is not None and rig.host is not None:
            rig.host.close()


def settle(path: str) -> None:
    """Write back what the previous path dirtied, so that no path pays for
    another's writeback (untimed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_raw(path: str, size: int, bs: int, rand: bool, write: bool, seconds: float,
            direct: bool, depth: int) -> tuple[int, float]:
    ffi, lib = load_raw_io()
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    offs = offsets(size, bs, rand, seed=bs + write)
    chunk = 4096
    bufs = mmap.mmap(-1, bs * depth)
    bufs.write(random.Random(2).randbytes(bs) * depth)
    cbufs = ffi.from_buffer(bufs)
    try:
        requests, spent = 0, 0.0
        while spent < seconds:
            table = ffi.new("int64_t[]", [next(offs) for _ in range(chunk)])
            t0 = time.perf_counter()
            done = lib.raw_loop(fd, ffi.cast("char *", cbufs), depth, bs, table, chunk, int(write))
            spent += time.perf_counter() - t0
            if done != chunk:
                raise RuntimeError(f"raw {'pwrite' if write else 'pread'} failed")
            requests += chunk
        return requests, spent
    finally:
        os.close(fd)
        del cbufs
        bufs.close()


def measure(seconds: float, runs: int, size: int = 256 << 20, depth: int = 32,
            directory: str = "/var/tmp", direct: bool = False, poll_us: int = 50,
            cases=CASES) -> list:
    """Figures for bench/run: per case, each path's IOPS over ``runs`` runs,
    next to raw pread/pwrite measured in the same runs."""
    from report import Figure
    try:
        resolve("native", "bench")
        native = True
    except Exception:
        native = False
    path = make_image(directory, size)
    figures = []
    try:
        for name, bs, rand, write in cases:
            got: dict[str, list[float]] = {}
            for _ in range(runs):
                def add(key, value):
                    got.setdefault(key, []).append(value)
                settle(path)
                n, t = run_queue(path, size, bs, rand, write, depth, seconds, direct, "python")[:2]
                add("python", n / t)
                if native:
                    settle(path)
                    n, busy, wall, _ = run_queue(path, size, bs, rand, write, depth, seconds, direct,
                                                 "native")
                    add("native", n / wall)
                    add("native busy", n / busy)
                    add("native cpu", (busy / n) * 1e6)
                    settle(path)
                    n, busy, wall, polled = run_queue(path, size, bs, rand, write, depth, seconds,
                                                      direct, "native", poll_us)
                    add("polling", n / wall)
                    add("polling cpu", ((busy + polled) / n) * 1e6)
                settle(path)
                n, t = run_raw(path, size, bs, rand, write, seconds, direct, depth)
                add("raw", n / t)
            g = "virtio-blk"
            raw = ("raw C " + ("pwrite" if write else "pread"), got["raw"])
            figures.append(Figure(g, f"{name}: python queue, device time", "IOPS", got["python"], *raw))
            if native:
                figures += [
                    Figure(g, f"{name}: native, kick-to-interrupt wall", "IOPS", got["native"], *raw),
                    Figure(g, f"{name}: native + polling {poll_us} us, kick-to-interrupt wall", "IOPS",
                           got["polling"], *raw),
                    Figure(g, f"{name}: native, engine busy time", "IOPS", got["native busy"], *raw,
                           diagnostic=True),
                    Figure(g, f"{name}: engine CPU per request, polling (busy + polling)", "µs",
                           got["polling cpu"], "engine CPU per request, no polling", got["native cpu"],
                           diagnostic=True),
                ]
    finally:
        os.unlink(path)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per case and path (default 5)")
    ap.add_argument("--size", default="256M", help="image size (default 256M)")
    ap.add_argument("--depth", type=int, default=32,
                    help="requests per notification (default 32, like iodepth=32)")
    ap.add_argument("--dir", default="/var/tmp", help="where the image goes (not tmpfs)")
    ap.add_argument("--cache", choices=("writeback", "none"), default="writeback")
    args = ap.parse_args()
    size = int(Size.parse(args.size))
    direct = args.cache == "none"
    if not 1 <= args.depth <= QUEUE_SIZE:
        ap.error(f"--depth must be 1..{QUEUE_SIZE}")

    try:
        resolve("native", "bench")
        native = True
    except Exception as e:
        print(f"(no native column: {e})")
        native = False
    print(describe())
    print(f"image: {size >> 20} MiB in {args.dir}, {filesystem_of(os.path.realpath(args.dir))}; "
          f"cache = {args.cache}; {args.depth} requests per notification; "
          f"{args.seconds:g} s per case and path")
    path = make_image(args.dir, size)
    paths = ["python", "native", "native wall", "raw"] if native else ["python", "raw"]
    try:
        header = f"{'case':22}" + "".join(f" {name:>12}" for name in paths) + "   (IOPS)"
        header += "  native/python  native/raw" if native else "  python/raw"
        print()
        print(header)
        print("-" * len(header))
        for name, bs, rand, write in CASES:
            iops = {}
            settle(path)
            n, t = run_queue(path, size, bs, rand, write, args.depth, args.seconds, direct,
                             "python")[:2]
            iops["python"] = n / t
            if native:
                settle(path)
                n, busy, wall, _ = run_queue(path, size, bs, rand, write, args.depth, args.seconds,
                                             direct, "native")
                iops["native"], iops["native wall"] = n / busy, n / wall
            settle(path)
            n, t = run_raw(path, size, bs, rand, write, args.seconds, direct, args.depth)
            iops["raw"] = n / t
            line = f"{name:22}" + "".join(f" {iops[k]:12.0f}" for k in paths) + "        "
            if native:
                line += (f"  {iops['native'] / iops['python']:12.1f}x"
                         f"  {iops['native'] / iops['raw']:9.0%}")
            else:
                line += f"  {iops['python'] / iops['raw']:10.0%}"
            print(line + f"   ({bs >> 10} KiB: " + ", ".join(
                f"{k} {iops[k] * bs / 1e6:.0f} MB/s" for k in paths) + ")", flush=True)
        print()
        print("python: VirtioBlk.process + should_notify; native: the C engine's busy time; "
              "native wall: kick eventfd -> used.idx (adds the thread wake-up); raw: C "
              "pread/pwrite loop, one request at a time")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
