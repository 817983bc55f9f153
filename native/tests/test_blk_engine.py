"""The virtio-blk engine's own duties (src/blk.c on src/engine.c): pausing,
MSI-X masking, INTx's ISR bits and resampling, requests handed to Python, a
hostile guest."""
import os
import select
import time

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.plugin_api import VirtqueueError
from kvmkit.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator

pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
blk_mod = pytest.importorskip("kvmkit_virtio_blk.blk", reason="kvmkit-virtio-blk is not installed")
from kvmkit_native.backend import backend  # noqa: E402
from kvmkit_virtio_blk import protocol as p  # noqa: E402
from kvmkit_virtio_blk.backend import FileBackend  # noqa: E402

MEM = 4 << 20
IMAGE = bytes(range(256)) * 4096          # 1 MiB


@pytest.fixture
def rig(tmp_path, make_host):
    made = []

    def make(intx=False, event_idx=False, poll_us=0):
        path = tmp_path / f"disk{len(made)}.img"
        path.write_bytes(IMAGE)
        dev = blk_mod.VirtioBlk(FileBackend(path), serial="engine", poll_us=poll_us)
        host = make_host(intx=intx)
        dev.queue_backend, dev.host = backend, host
        mem = GuestMemory(MEM, backing=bytearray(MEM))
        alloc = GuestAllocator(mem, 0x100000)
        drv = DriverQueue(mem, blk_mod.QUEUE_SIZE, GuestAllocator(mem, 0x1000, 0x100000),
                          event_idx=event_idx)
        queue = backend.split_queue(mem, blk_mod.QUEUE_SIZE, *drv.addresses,
                                    event_idx=event_idx, indirect=False)
        features = dev.features | (1 << VIRTIO_F_VERSION_1)
        dev.activate([queue], features | ((1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0))
        assert host.engine is dev.engine is not None
        made.append(dev)
        return dev, host, drv, mem, alloc

    yield make
    for dev in made:
        dev.close()


def read_request(drv, mem, alloc, sector, n=512):
    hdr = alloc.put(p.HEADER.pack(p.T_IN, 0, sector))
    data, status = alloc.alloc(n, 512), alloc.alloc(1, 1)
    mem.write(status, b"\xee")
    drv.add([(hdr, 16)], [(data, n), (status, 1)])
    return data, status


def wait_used(drv, count, timeout=5.0, engine=None):
    deadline = time.monotonic() + timeout
    while (drv.used_idx - drv.last_used_idx) & 0xFFFF < count and time.monotonic() < deadline:
        if engine is not None:
            engine.service()
        time.sleep(0.001)
    return drv.used()


def test_reads_through_the_engine_signal_the_msix_irqfd(rig):
    dev, host, drv, mem, alloc = rig()
    data, status = read_request(drv, mem, alloc, 2)
    os.eventfd_write(host.kick_fd, 1)
    assert [w for _, w in wait_used(drv, 1)] == [513]
    assert mem.read(status, 1) == b"\0" and mem.read(data, 512) == IMAGE[1024:1536]
    assert host.interrupts(wait=2) == 1
    assert dev.engine.stats()["requests"] == 1


def test_pause_holds_requests_until_resume(rig):
    dev, host, drv, mem, alloc = rig()
    dev.engine.pause()
    read_request(drv, mem, alloc, 0)
    os.eventfd_write(host.kick_fd, 1)
    time.sleep(0.3)
    assert drv.used_idx == 0 and dev.engine.stats()["requests"] == 0
    dev.engine.resume()
    assert len(wait_used(drv, 1)) == 1


def test_masked_vector_keeps_the_interrupt_pending_until_unmasked(rig):
    dev, host, drv, mem, alloc = rig()
    dev.engine.set_masked(True)
    read_request(drv, mem, alloc, 0)
    os.eventfd_write(host.kick_fd, 1)
    assert len(wait_used(drv, 1)) == 1
    assert host.interrupts(wait=0.2) == 0            # pending, not sent
    dev.engine.set_masked(False)
    assert host.interrupts(wait=2) == 1              # sent on unmask, once
    dev.engine.set_masked(False)
    assert host.interrupts(wait=0.1) == 0


def test_intx_sets_the_isr_and_reasserts_at_eoi_while_it_is_set(rig):
    dev, host, drv, mem, alloc = rig(intx=True)
    read_request(drv, mem, alloc, 0)
    os.eventfd_write(host.kick_fd, 1)
    assert len(wait_used(drv, 1)) == 1
    assert host.interrupts(wait=2) == 1
    os.eventfd_write(host.resample_fd, 1)               # EOI, ISR not read: assert again
    assert host.interrupts(wait=2) == 1
    assert dev.engine.take_isr() == 1                 # the guest reads (and clears) ISR
    assert dev.engine.take_isr() == 0
    os.eventfd_write(host.resample_fd, 1)               # EOI after the read: the line stays low
    assert host.interrupts(wait=0.3) == 0


def test_get_id_is_handed_to_python_and_completed(rig):
    dev, host, drv, mem, alloc = rig()
    hdr = alloc.put(p.HEADER.pack(p.T_GET_ID, 0, 0))
    ident, status = alloc.alloc(p.ID_BYTES), alloc.alloc(1, 1)
    drv.add([(hdr, 16)], [(ident, p.ID_BYTES), (status, 1)])
    os.eventfd_write(host.kick_fd, 1)
    assert select.select([dev.engine.event_fd], [], [], 2)[0]
    used = wait_used(drv, 1, engine=dev.engine)
    assert [w for _, w in used] == [p.ID_BYTES + 1]
    assert mem.read(ident, 6) == b"engine" and mem.read(status, 1) == b"\0"
    assert dev.engine.stats()["deferred"] == 1


def test_a_chain_outside_guest_ram_breaks_the_queue_after_earlier_requests(rig):
    dev, host, drv, mem, alloc = rig()
    read_request(drv, mem, alloc, 0)
    drv.write_desc(100, MEM + 4096, 16)               # a buffer outside guest RAM
    drv.submit_head(100)
    os.eventfd_write(host.kick_fd, 1)
    assert select.select([dev.engine.event_fd], [], [], 2)[0]
    with pytest.raises(VirtqueueError, match="not inside guest RAM"):
        dev.engine.service()
    assert len(drv.used()) == 1                       # the good one was served
    os.eventfd_write(host.kick_fd, 1)                    # later kicks do nothing
    time.sleep(0.1)
    assert drv.used_idx == 1


def test_register_garbage_in_every_ring_slot_never_crashes(rig):
    dev, host, drv, mem, alloc = rig()
    rnd = __import__("random").Random(7)
    for slot in range(blk_mod.QUEUE_SIZE):
        drv.write_desc(slot, rnd.getrandbits(64), rnd.getrandbits(32),
                       flags=rnd.getrandbits(16), next=rnd.getrandbits(16))
        drv.submit_head(rnd.getrandbits(16) % blk_mod.QUEUE_SIZE)
    os.eventfd_write(host.kick_fd, 1)
    select.select([dev.engine.event_fd], [], [], 2)
    with pytest.raises(VirtqueueError):
        dev.engine.service()


@pytest.mark.parametrize("event_idx", [False, True])
def test_polling_serves_a_request_made_without_a_kick(rig, event_idx):
    """poll_us: after a batch the engine watches the avail ring, so a request
    the driver adds within the bound is served with no kick at all."""
    dev, host, drv, mem, alloc = rig(event_idx=event_idx, poll_us=2_000_000)
    read_request(drv, mem, alloc, 2)
    os.eventfd_write(host.kick_fd, 1)
    assert len(wait_used(drv, 1)) == 1
    data, status = read_request(drv, mem, alloc, 3)          # no kick
    assert [w for _, w in wait_used(drv, 1, timeout=1.5)] == [513]
    assert mem.read(data, 512) == IMAGE[1536:2048]
    stats = dev.engine.stats()
    assert stats["polled"] >= 1 and stats["poll_ns"] > 0 and stats["requests"] == 2


@pytest.mark.parametrize("poll_us", [0, 20_000])
def test_without_polling_or_after_it_an_unkicked_request_waits_for_its_kick(rig, poll_us):
    dev, host, drv, mem, alloc = rig(poll_us=poll_us)
    read_request(drv, mem, alloc, 2)
    os.eventfd_write(host.kick_fd, 1)
    assert len(wait_used(drv, 1)) == 1
    time.sleep(0.2)                                         # past a 20 ms bound
    read_request(drv, mem, alloc, 3)
    assert wait_used(drv, 1, timeout=0.3) == []
    os.eventfd_write(host.kick_fd, 1)
    assert len(wait_used(drv, 1)) == 1
    assert dev.engine.stats()["polled"] == 0
