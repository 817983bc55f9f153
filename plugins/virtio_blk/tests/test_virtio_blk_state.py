"""virtio-blk state for snapshots, behind the core's real virtio-pci transport
(FakeMachine, no KVM), on the python queue and the native C engine: a disk
saved with a request the device took but had not answered is answered before
the save, and the restored disk goes on from the saved indices."""
import json
import os
import time

import pytest

from kvmkit.device_state import restore_device, save_device
from kvmkit.fake_machine import FakeMachine
from kvmkit.memory import GuestMemory
from kvmkit.testing import config, plugin_manager
from kvmkit.virtio.pci_test_driver import PciVirtioDriver
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.plugin import SPEC, plugin

MEM = 4 << 20
MiB = 1 << 20


def build(image, queue, memory=None):
    m = FakeMachine(memory or GuestMemory(MEM, backing=bytearray(MEM)))
    ctx = m.context("virtio-blk.0")
    pm = plugin_manager(plugin)
    dev = pm.hook.kvmkit_create_device(kind="virtio-blk",
                                       config=config(SPEC, path=image, queue=queue), ctx=ctx)
    return m, ctx, dev, ctx.virtio_runtimes[0]


def wait_used(drv, count, timeout=5.0):
    q = drv.queues[0]
    deadline = time.monotonic() + timeout
    while (q.used_idx - q.last_used_idx) & 0xFFFF < count and time.monotonic() < deadline:
        time.sleep(0.002)
    return q.used()


def request(drv, rtype, sector=0, data=b"", read=0):
    head, wr = drv.submit(0, readable=[p.HEADER.pack(rtype, 0, sector)] + ([data] if data else []),
                          writable=([read] if read else []) + [1])
    return head, wr


def kick(drv, run=True):
    """Notify queue 0; ``run``: do what the worker does (the python queue is
    served, chains an engine handed to Python are served too)."""
    drv.queues[0].publish()
    drv.write(drv.bar + 0x3000, 2, 0)
    if run:
        drv.machine.run_kicks()


def save_paused(ctx, dev, runtime):
    """What Machine.pause does for the device before the save: engines paused."""
    runtime.pause()
    try:
        return save_device(ctx, dev)
    finally:
        runtime.resume()


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    return path


@pytest.mark.parametrize("queue", ["python", "native"])
def test_saved_disk_answers_what_it_took_and_goes_on_after_restore(image, queue):
    m, ctx, dev, rt = build(image, queue)
    try:
        drv = PciVirtioDriver(m, rt)
        assert (dev.engine is not None) == (queue == "native")
        request(drv, p.T_OUT, 8, b"A" * 512)
        kick(drv)
        assert len(wait_used(drv, 1)) == 1
        # GET_ID: the C engine takes it and hands it to Python, which no worker
        # serves here: the request is in flight when the VM pauses.
        gid, gid_buf = request(drv, p.T_GET_ID, read=20)
        kick(drv, run=queue == "python")              # no worker serves what the engine hands over
        if queue == "native":
            time.sleep(0.05)
            assert drv.queues[0].used() == []               # taken, not answered
        else:
            assert [h for h, _ in drv.queues[0].used()] == [gid]
        state = save_paused(ctx, dev, rt)
        json.loads(json.dumps(state))
        if queue == "native":
            assert [h for h, _ in drv.queues[0].used()] == [gid]   # answered before the save
        assert drv.written(gid_buf, 1)[:1] != b"\xee"
        rings = state["virtio"][0]["transport"]["rings"][0]
        assert rings["last_avail"] == rings["used"] == 2
        mem2 = GuestMemory(MEM, backing=bytearray(m.memory.read(0, MEM)))
    finally:
        m.close()
        dev.close()
    m2, ctx2, dev2, rt2 = build(image, queue, mem2)
    try:
        restore_device(ctx2, dev2, state)
        assert (dev2.engine is not None) == (queue == "native")
        drv2 = drv.clone(m2, rt2)
        head, buf = request(drv2, p.T_IN, 8, read=512)
        kick(drv2)
        got = wait_used(drv2, 1)
        assert [h for h, _ in got] == [head]
        assert drv2.written(buf, 513) == b"A" * 512 + bytes([p.S_OK])
    finally:
        m2.close()
        dev2.close()


def test_image_of_another_size_is_announced_as_a_resize(image, tmp_path):
    m, ctx, dev, rt = build(image, "python")
    try:
        PciVirtioDriver(m, rt)
        state = save_paused(ctx, dev, rt)
    finally:
        m.close()
        dev.close()
    os.truncate(image, 2 * MiB)
    m2, ctx2, dev2, rt2 = build(image, "python")
    try:
        restore_device(ctx2, dev2, state)
        assert os.eventfd_read(rt2.vectors[1].fd) == 1        # the configuration-change interrupt
        assert dev2._config_generation == state["virtio"][0]["transport"]["config_generation"] + 1
    finally:
        m2.close()
        dev2.close()
