"""Activation follows the virtio status rules, and every model's activate is idempotent.

A driver may not clear status bits except by writing 0 (virtio 1.2, 2.1.2).
Before: clearing DRIVER_OK and setting it again activated the device once
more, and virtio-blk started one more C engine each time (50 toggles: +50
threads, +102 fds), the old ones still serving stale rings.
"""
from __future__ import annotations

import logging
import os
import socket
import time

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.testing import EngineHost
from kvmkit.virtio.backends import resolve
from kvmkit.virtio.device import VIRTIO_F_VERSION_1
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.pci_transport import (COMMON, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                         STATUS_NEEDS_RESET, VirtioPciTransport)

MEM = 1 << 20
TOGGLES = 50


def threads_and_fds() -> tuple[int, int]:
    """This process's threads (C ones too) and open fds."""
    return len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))


def settled(check, timeout: float = 2.0) -> tuple[int, int]:
    """threads_and_fds() once ``check`` holds for it, or after ``timeout``: a
    joined thread can stay listed in /proc/self/task for a moment (glibc's
    pthread_join returns when the kernel clears the thread's tid, before the
    exiting task is gone)."""
    deadline = time.monotonic() + timeout
    while True:
        now = threads_and_fds()
        if check(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def native():
    pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed (pip install ./native)")
    return resolve("native", "test")


@pytest.fixture
def blk_on_native(tmp_path):
    blk = pytest.importorskip("kvmkit_virtio_blk.blk")
    from kvmkit_virtio_blk.backend import FileBackend
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(64 << 10))
    queues = native()
    dev = blk.VirtioBlk(FileBackend(image))
    host = EngineHost()
    dev.queue_backend, dev.host = queues, host
    yield dev, queues, host
    dev.close()
    host.close()


class Driver:
    """Plays the guest's driver on the common configuration."""

    def __init__(self, dev, queue_factory=None):
        self.mem = GuestMemory(MEM, backing=bytearray(MEM))
        kw = {"queue_factory": queue_factory} if queue_factory else {}
        self.t = VirtioPciTransport(dev, self.mem, **kw)
        self.alloc = GuestAllocator(self.mem, 0x1000)
        self.dev = dev

    def common(self, off, size, value=None):
        if value is None:
            return self.t.read(COMMON + off, size)
        self.t.write(COMMON + off, size, value)

    def bring_up(self):
        self.common(0x14, 1, 0)
        self.common(0x14, 1, 3)
        self.common(0x08, 4, 1)
        self.common(0x0C, 4, 1)                                    # VERSION_1
        self.common(0x14, 1, 3 | STATUS_FEATURES_OK)
        for index, size in enumerate(self.dev.queue_sizes):
            drv = DriverQueue(self.mem, size, self.alloc)
            desc, avail, used = drv.addresses
            self.common(0x16, 2, index)
            self.common(0x20, 8, desc)
            self.common(0x28, 8, avail)
            self.common(0x30, 8, used)
            self.common(0x1C, 2, 1)
        self.common(0x14, 1, 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK)


def test_clearing_driver_ok_without_a_reset_is_refused_and_needs_reset(blk_on_native):
    dev, queues, host = blk_on_native
    activations = []
    real = dev.activate
    dev.activate = lambda q, f: (activations.append(1), real(q, f))
    d = Driver(dev, queues.split_queue)
    d.bring_up()
    assert host.engine is not None and len(activations) == 1
    before = threads_and_fds()
    running = 3 | STATUS_FEATURES_OK | STATUS_DRIVER_OK
    for _ in range(TOGGLES):
        d.common(0x14, 1, 3 | STATUS_FEATURES_OK)                 # clear DRIVER_OK ...
        d.common(0x14, 1, running)                                 # ... and set it again
    assert settled(lambda now: now == before) == before
    assert len(activations) == 1
    assert d.common(0x14, 1) == running | STATUS_NEEDS_RESET      # the driver must reset us
    d.common(0x14, 1, 0)                                           # a reset stops the engine
    assert host.engine is None and dev.engine is None
    after_reset = settled(lambda now: now[0] < before[0])
    assert after_reset[0] < before[0]
    d.bring_up()                                                   # and the device works again
    assert len(activations) == 2 and dev.engine is not None
    assert d.common(0x14, 1) == running


def test_the_driver_cannot_set_needs_reset_or_clear_bits_other_than_by_reset():
    from kvmkit.virtio.device import VirtioDevice

    class Dev(VirtioDevice):
        device_id = 0x3F
        queue_sizes = (4,)

    d = Driver(Dev())
    d.common(0x14, 1, 3 | STATUS_NEEDS_RESET)
    assert d.common(0x14, 1) == 3
    d.common(0x14, 1, 1)                                           # clears DRIVER
    assert d.common(0x14, 1) == 3 | STATUS_NEEDS_RESET
    d.common(0x14, 1, 0)
    assert d.common(0x14, 1) == 0


def test_virtio_blk_activate_is_idempotent(blk_on_native):
    dev, queues, host = blk_on_native
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    alloc = GuestAllocator(mem, 0x1000)

    def queue():
        drv = DriverQueue(mem, 256, alloc)
        return queues.split_queue(mem, 256, *drv.addresses, event_idx=False, indirect=False)

    dev.activate([queue()], 1 << VIRTIO_F_VERSION_1)
    first = dev.engine
    before = threads_and_fds()
    for _ in range(TOGGLES):
        dev.activate([queue()], 1 << VIRTIO_F_VERSION_1)
    assert settled(lambda now: now == before) == before
    assert dev.engine is not first and host.engine is dev.engine
    dev.reset()
    assert dev.engine is None and settled(lambda now: now[0] < before[0])[0] < before[0]


def test_virtio_net_activate_is_idempotent():
    net = pytest.importorskip("kvmkit_virtio_net.net")
    from kvmkit_virtio_net.backends import TapBackend
    queues = native()
    sock, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setblocking(False)
    tap = type("Tap", (), {"fd": sock.fileno(), "ifname": "fake0", "supported_offloads": 0,
                           "offloads": 0, "set_offloads": lambda self, f: None,
                           "close": lambda self: None})()
    dev = net.VirtioNet(TapBackend(tap, spawn=None, log=logging.getLogger("test")),
                        mac=b"\x52\x54\x00\x00\x00\x01")
    host = EngineHost(index=1)
    dev.queue_backend, dev.host = queues, host
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    alloc = GuestAllocator(mem, 0x1000)

    def rings():
        return [queues.split_queue(mem, n, *DriverQueue(mem, n, alloc).addresses, event_idx=False,
                                   indirect=False)
                for n in net.QUEUE_SIZES]

    try:
        dev.activate(rings(), 1 << VIRTIO_F_VERSION_1)
        before = threads_and_fds()
        for _ in range(TOGGLES):
            current = rings()
            dev.activate(current, 1 << VIRTIO_F_VERSION_1)
        assert settled(lambda now: now == before) == before
        assert dev.tx_engine is not None and host.engine is dev.tx_engine
        assert dev.queues[1] is current[1]                         # it serves the current ring
        dev.reset()
        assert dev.tx_engine is None and settled(lambda now: now[0] < before[0])[0] < before[0]
    finally:
        dev.close()
        host.close()
        sock.close()
        peer.close()


def test_virtio_rng_activate_is_idempotent():
    rng = pytest.importorskip("kvmkit_example_virtio_rng.rng")
    dev = rng.VirtioRng(source=lambda n: bytes(n))
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    alloc = GuestAllocator(mem, 0x1000)
    python = resolve("python", "test")
    before = threads_and_fds()
    for _ in range(TOGGLES):
        q = python.split_queue(mem, 64, *DriverQueue(mem, 64, alloc).addresses, event_idx=False,
                               indirect=False)
        dev.activate([q], 1 << VIRTIO_F_VERSION_1)
    assert dev.queues == [q] and settled(lambda now: now == before) == before
