"""Crash consistency of the C virtio-blk data path: a process running the
native engine is SIGKILLed at random points while it writes and flushes; every
write it saw completed, and every write a completed FLUSH covered, must be in
the image.  And the engine's ``syncs`` counts fdatasync calls once they
returned, ``sync_errors`` those that failed.

Each trial forks a child that plays the guest driver against a BlkEngine (no
VM): per generation it writes K requests to sectors of its own, waits for
them, then sends a FLUSH and waits for it, reporting both on a pipe.  The
parent kills it after a random delay and checks the image.
"""
from __future__ import annotations

import os
import random
import select
import signal
import time

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.testing import EngineHost
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator

pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
p = pytest.importorskip("kvmkit_virtio_blk.protocol", reason="kvmkit-virtio-blk is not installed")
from kvmkit_native.backend import backend  # noqa: E402
from kvmkit_native.blk import BlkEngine  # noqa: E402

TRIALS = 100
K = 4                         # write requests per generation
REQ = 4096                    # bytes per write request (8 sectors)
GENS = 64                     # generations before the child idles
IMAGE_SIZE = GENS * K * REQ
QUEUE_SIZE = 64
MEM = 2 << 20


def pattern(gen: int, i: int) -> bytes:
    """What request ``i`` of generation ``gen`` writes: unique per request."""
    head = f"gen {gen:05d} req {i} ".encode()
    return (head * (REQ // len(head) + 1))[:REQ]


def offset(gen: int, i: int) -> int:
    return (gen * K + i) * REQ


class Driver:
    """The guest's side, against the engine's C thread."""

    def __init__(self, image_fd: int, capacity: int):
        self.mem = GuestMemory(MEM, backing=bytearray(MEM))
        self.drv = DriverQueue(self.mem, QUEUE_SIZE, GuestAllocator(self.mem, 0x1000, 0x100000))
        self.alloc = GuestAllocator(self.mem, 0x100000)
        queue = backend.split_queue(self.mem, QUEUE_SIZE, *self.drv.addresses,
                                    event_idx=False, indirect=False)
        self.host = EngineHost()
        self.engine = BlkEngine(queue, image_fd=image_fd, capacity=capacity, readonly=False,
                                writethrough=False, direct_align=0, kick_fd=self.host.kick_fd,
                                irq_fd=self.host.irq_fd, resample_fd=-1,
                                on_request=self._python)

    @staticmethod
    def _python(chain) -> int:
        raise AssertionError(f"the engine handed request {chain.head} to Python")

    def request(self, rtype: int, sector: int = 0, data: bytes = b"") -> int:
        """Submit one request; the guest address of its status byte."""
        hdr = self.alloc.put(p.HEADER.pack(rtype, 0, sector))
        readable = [(hdr, p.HEADER.size)] + ([(self.alloc.put(data, 512), len(data))] if data else [])
        status = self.alloc.alloc(1, 1)
        self.mem.write(status, b"\xee")
        self.drv.add(readable, [(status, 1)])
        return status

    def complete(self, statuses: list[int], timeout: float = 10.0) -> None:
        """Kick, and wait until every request is used with status OK."""
        self.host.kick()
        deadline = time.monotonic() + timeout
        while self.drv.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError("the engine did not complete the requests")
            if select.select([self.engine.event_fd, self.host.irq_fd], [], [], 0.01)[0]:
                self.host.interrupts()
                self.engine.service()
            self.drv.used()
        bad = [s for s in statuses if self.mem.read(s, 1) != b"\0"]
        if bad:
            raise AssertionError(f"{len(bad)} request(s) failed")
        self.alloc.reset()


def writer(image: str, report_fd: int) -> None:
    """The child: generations of writes and flushes until killed."""
    fd = os.open(image, os.O_RDWR)
    d = Driver(fd, IMAGE_SIZE // 512)
    os.write(report_fd, b"R\n")
    for gen in range(GENS):
        d.complete([d.request(p.T_OUT, offset(gen, i) // 512, pattern(gen, i)) for i in range(K)])
        os.write(report_fd, f"W {gen}\n".encode())
        d.complete([d.request(p.T_FLUSH)])
        os.write(report_fd, f"F {gen}\n".encode())
    os.write(report_fd, b"D\n")
    while True:                                   # done: wait to be killed
        time.sleep(1)


def run_trial(image, rng: random.Random) -> tuple[int, int, bool]:
    """Fork a writer, kill it at a random point; (last gen written, last gen
    flushed, whether it had finished)."""
    with open(image, "wb") as f:
        f.truncate(IMAGE_SIZE)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # the child
        code = 1
        try:
            os.close(r)
            writer(str(image), w)
        except BaseException:
            import traceback
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    got = b""
    # The kill point is chosen in the writer's own progress, not in wall time,
    # so that a fast disk or a slow CI host both get kills in the middle of
    # the writes: just after a random generation's writes or its flush
    # completed, plus a random sub-millisecond delay.
    mark = f"{rng.choice('WF')} {rng.randrange(GENS)}\n".encode()
    try:
        deadline = time.monotonic() + 30
        while mark not in got:
            assert time.monotonic() < deadline, f"the writer did not report {mark!r} in 30 s"
            if select.select([r], [], [], 0.1)[0]:
                chunk = os.read(r, 4096)
                assert chunk, "the writer died before it was killed"
                got += chunk
        time.sleep(rng.uniform(0, 0.001))
    finally:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    while chunk := os.read(r, 65536):               # what it reported before it died
        got += chunk
    os.close(r)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    written = flushed = -1
    for line in got.decode().splitlines():
        kind, _, gen = line.partition(" ")
        if kind == "W":
            written = int(gen)
        elif kind == "F":
            flushed = int(gen)
    return written, flushed, b"D\n" in got


def test_sigkill_during_writes_loses_no_completed_or_flushed_write(tmp_path):
    rng = random.Random(13)
    image = tmp_path / "disk.img"
    ok, mid_write, flushed_any, finished = 0, 0, 0, 0
    for trial in range(TRIALS):
        written, flushed, done = run_trial(image, rng)
        data = image.read_bytes()
        for gen in range(written + 1):
            for i in range(K):
                got = data[offset(gen, i):offset(gen, i) + REQ]
                assert got == pattern(gen, i), (
                    f"trial {trial}: generation {gen} request {i} was completed"
                    f"{' and flushed' if gen <= flushed else ''} but the image holds "
                    f"{got[:24]!r}")
        ok += 1
        mid_write += not done
        flushed_any += flushed >= 0
        finished += done
    print(f"\nblk crash consistency: {ok} of {TRIALS} trials kept every completed and flushed "
          f"write ({mid_write} killed mid-run, {flushed_any} after at least one flush, "
          f"{finished} after all {GENS} generations)")
    assert ok == TRIALS
    assert mid_write >= TRIALS // 2 and flushed_any >= TRIALS // 2   # the kills hit the writes


def test_syncs_count_completed_fdatasyncs_and_failures_apart(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)
    fd = os.open(img, os.O_RDWR)
    try:
        d = Driver(fd, (1 << 20) // 512)
        d.complete([d.request(p.T_OUT, 0, pattern(0, 0))])
        d.complete([d.request(p.T_FLUSH)])
        d.complete([d.request(p.T_FLUSH)])
        stats = d.engine.stats()
        d.engine.stop()
        d.host.close()
    finally:
        os.close(fd)
    assert (stats["syncs"], stats["sync_errors"]) == (2, 0)
    null = os.open("/dev/null", os.O_RDWR)          # writes succeed, fdatasync fails (EINVAL)
    try:
        d = Driver(null, 2048)
        d.complete([d.request(p.T_OUT, 0, pattern(0, 0))])
        status = d.request(p.T_FLUSH)
        d.host.kick()
        deadline = time.monotonic() + 10
        while d.drv.in_flight and time.monotonic() < deadline:
            d.drv.used()
            time.sleep(0.001)
        assert d.mem.read(status, 1) == bytes([p.S_IOERR])
        stats = d.engine.stats()
        d.engine.stop()
        d.host.close()
    finally:
        os.close(null)
    assert (stats["syncs"], stats["sync_errors"]) == (0, 1)
