#!/usr/bin/env python3
"""virtio-blk through the pure-Python virtqueue, against plain system calls.

The harness plays the guest driver with kvmkit's virtqueue driver model: a
GuestMemory (an anonymous mapping, as in a VM), a VirtioBlk on a temporary
raw image on disk, requests written into guest memory (header, data buffer,
status byte; one indirect descriptor each, EVENT_IDX on, as Linux drives
it), then ``process(0)`` and ``should_notify()`` called as the transport's
notify path would.  Only the device side is timed (process + should_notify):
the driver model's own Python work stands in for the guest kernel's and is
left out.  Next to it, in the same run, plain ``os.pread``/``os.pwrite`` of
the same file, block sizes and offsets.

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
from kvmkit.plugin_api import Size
from kvmkit.virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                                  VIRTIO_F_VERSION_1)
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.queue import SplitQueue
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.backend import FileBackend
from kvmkit_virtio_blk.blk import QUEUE_SIZE, VirtioBlk

from machine_info import describe  # bench/ is on sys.path when run as a script

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

    def __init__(self, dev: VirtioBlk, depth: int, bs: int, direct_aligned: bool):
        self.mem = GuestMemory(GUEST_RAM)
        rings = GuestAllocator(self.mem, 0x1000, 0x100000)
        self.alloc = GuestAllocator(self.mem, 0x100000)
        self.drv = DriverQueue(self.mem, QUEUE_SIZE, rings, indirect_max=4, event_idx=True)
        self.queue = SplitQueue(self.mem, QUEUE_SIZE, *self.drv.addresses,
                                event_idx=True, indirect=True)
        features = (dev.features | (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_RING_EVENT_IDX)
                    | (1 << VIRTIO_F_RING_INDIRECT_DESC))
        dev.activate([self.queue], features)
        self.dev = dev
        self.bs = bs
        self.slots = [(self.alloc.alloc(16, 16), self.alloc.alloc(bs, 4096 if direct_aligned else 512),
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
              seconds: float, direct: bool) -> tuple[int, float]:
    dev = VirtioBlk(FileBackend(path, direct=direct), serial="bench")
    try:
        rig = QueueRig(dev, depth, bs, direct)
        offs = offsets(size, bs, rand, seed=bs + write)
        kind = p.T_OUT if write else p.T_IN
        rig.batch(kind, offs)                                   # warm up
        requests, busy = 0, 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            busy += rig.batch(kind, offs)
            requests += depth
        return requests, busy
    finally:
        dev.close()


def run_plain(path: str, size: int, bs: int, rand: bool, write: bool, seconds: float,
              direct: bool) -> tuple[int, float]:
    fd = os.open(path, os.O_RDWR | (os.O_DIRECT if direct else 0))
    buf = mmap.mmap(-1, bs)                                   # page-aligned, as O_DIRECT needs
    buf.write(random.Random(2).randbytes(bs))
    view = memoryview(buf)
    offs = offsets(size, bs, rand, seed=bs + write)
    try:
        requests = 0
        start = time.perf_counter()
        deadline = start + seconds
        if write:
            while time.perf_counter() < deadline:
                for _ in range(64):
                    os.pwrite(fd, view, next(offs))
                requests += 64
        elif direct:                                          # pread's own buffer is unaligned
            while time.perf_counter() < deadline:
                for _ in range(64):
                    os.preadv(fd, [view], next(offs))
                requests += 64
        else:
            while time.perf_counter() < deadline:
                for _ in range(64):
                    os.pread(fd, bs, next(offs))
                requests += 64
        return requests, time.perf_counter() - start
    finally:
        os.close(fd)
        view.release()
        buf.close()


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

    print(describe())
    print(f"image: {size >> 20} MiB in {args.dir}, {filesystem_of(os.path.realpath(args.dir))}; "
          f"cache = {args.cache}; {args.depth} requests per notification; "
          f"{args.seconds:g} s per case and path")
    path = make_image(args.dir, size)
    try:
        header = (f"{'case':22} {'queue MB/s':>11} {'queue IOPS':>11} {'us/req':>7}   "
                  f"{'plain MB/s':>11} {'plain IOPS':>11} {'us/req':>7}   {'queue/plain':>11}")
        print()
        print(header)
        print("-" * len(header))
        for name, bs, rand, write in CASES:
            qn, qt = run_queue(path, size, bs, rand, write, args.depth, args.seconds, direct)
            pn, pt = run_plain(path, size, bs, rand, write, args.seconds, direct)
            q_iops, p_iops = qn / qt, pn / pt
            print(f"{name:22} {q_iops * bs / 1e6:11.1f} {q_iops:11.0f} {1e6 / q_iops:7.1f}   "
                  f"{p_iops * bs / 1e6:11.1f} {p_iops:11.0f} {1e6 / p_iops:7.1f}   "
                  f"{q_iops / p_iops:10.0%}")
        print()
        print("queue: VirtioBlk.process + should_notify time only (driver model excluded); "
              "plain: os.pread/os.pwrite loop")
    finally:
        os.unlink(path)


if __name__ == "__main__":
    main()
