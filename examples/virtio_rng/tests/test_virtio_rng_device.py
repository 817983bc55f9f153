"""The VirtioRng model driven by kvmkit.testing's virtqueue_driver fixture,
which plays the guest's virtio driver in guest memory."""
import pytest

from kvmkit.plugin_api import VirtqueueError
from kvmkit_example_virtio_rng.rng import QUEUE_SIZE, VirtioRng, getrandom


def counting(n):
    """A predictable entropy source: 0, 1, 2, ... (mod 256) across calls."""
    counting.next = getattr(counting, "next", 0)
    out = bytes((counting.next + i) & 0xFF for i in range(n))
    counting.next += n
    return out


@pytest.fixture
def rng():
    counting.next = 0
    return VirtioRng(source=counting)


def test_identity():
    dev = VirtioRng()
    assert (dev.device_id, dev.pci_class, tuple(dev.queue_sizes)) == (4, 0x00FF00, (QUEUE_SIZE,))
    assert dev.features == 0 and dev.config_bytes() == b""


def test_fills_a_writable_buffer(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    written, data = drv.request(0, writable=[16])
    assert (written, data) == (16, bytes(range(16)))


def test_fills_several_buffers_of_one_chain_in_order(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    req = drv.submit(0, writable=[3, 5, 8])
    assert drv.notify(0) == [(req.head, 16)]
    assert drv.written(req) == bytes(range(16))


def test_at_most_max_bytes_per_request(virtqueue_driver):
    dev = VirtioRng(max_bytes=10, source=lambda n: b"\x5a" * n)
    drv = virtqueue_driver(dev)
    req = drv.submit(0, writable=[64])
    assert drv.notify(0) == [(req.head, 10)]
    assert drv.written(req) == b"\x5a" * 10 + b"\xee" * 54      # the rest is untouched


def test_readable_buffers_are_ignored(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    written, data = drv.request(0, readable=[b"ignored"], writable=[4])
    assert (written, data) == (4, bytes(range(4)))


def test_a_chain_without_writable_buffers_comes_back_empty(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    written, _ = drv.request(0, readable=[b"x" * 8])
    assert written == 0 and rng.requests == 1 and rng.bytes_served == 0


def test_serves_every_chain_of_one_notification(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    reqs = [drv.submit(0, writable=[8]) for _ in range(QUEUE_SIZE)]       # a full ring
    assert drv.notify(0) == [(r.head, 8) for r in reqs]
    assert b"".join(drv.written(r) for r in reqs) == bytes(i & 0xFF for i in range(8 * QUEUE_SIZE))


@pytest.mark.parametrize("event_idx, indirect", [(True, False), (False, True), (True, True)])
def test_ring_features(virtqueue_driver, rng, event_idx, indirect):
    drv = virtqueue_driver(rng, event_idx=event_idx, indirect=indirect)
    for _ in range(3 * QUEUE_SIZE):                  # wrap the ring indices a few times
        written, data = drv.request(0, writable=[4], indirect=indirect)
        assert written == 4
    assert rng.bytes_served == 12 * QUEUE_SIZE


def test_hostile_chain_raises_virtqueue_error_for_the_transport(virtqueue_driver, rng):
    drv = virtqueue_driver(rng)
    drv.queues[0].submit_head(QUEUE_SIZE + 3)        # a head outside the descriptor table
    with pytest.raises(VirtqueueError):
        drv.notify(0)
    assert rng.requests == 0


def test_reset_then_reactivate(virtqueue_driver, rng, guest_memory):
    drv = virtqueue_driver(rng)
    drv.request(0, writable=[4])
    drv.reset()
    assert rng.queues == []
    drv = virtqueue_driver(rng)                      # the driver sets it up again
    assert drv.request(0, writable=[4])[0] == 4


def test_getrandom_gives_fresh_bytes():
    a, b = getrandom(32), getrandom(32)
    assert len(a) == len(b) == 32 and a != b


def test_getrandom_retries_short_reads(monkeypatch):
    import os
    chunks = iter([b"ab", b"c", b"def"])
    monkeypatch.setattr(os, "getrandom", lambda n: next(chunks)[:n])
    assert getrandom(6) == b"abcdef"


def test_max_bytes_must_be_positive():
    with pytest.raises(ValueError):
        VirtioRng(max_bytes=0)
