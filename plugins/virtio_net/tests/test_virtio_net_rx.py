"""Receiving: mergeable buffers, frames waiting for buffers, oversize frames,
the pending queue's limit; the control queue; reset; hostile rings."""
import random

import pytest

from netdriver import MAC, FakeBackend, NetDriver, frame_item
from kvmkit.memory import GuestMemory
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.queue import SplitQueue, VirtqueueError
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net.net import PENDING_LIMIT, VirtioNet

BASE = VirtioNet.BASE_FEATURES
NO_MRG = BASE & ~p.bits(p.F_MRG_RXBUF)
GSO_IN = BASE | p.bits(p.F_GUEST_CSUM, p.F_GUEST_TSO4)
GSO_HDR = p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, gso_type=p.GSO_TCPV4, hdr_len=54, gso_size=1448,
                      csum_start=34, csum_offset=16)


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


# -- mergeable receive buffers -----------------------------------------------------------------

def test_a_frame_spans_several_buffers_with_num_buffers(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    heads = drv.post_rx(8, size=1000)
    frame = payload(3500)
    dev.deliver(frame_item(frame, GSO_HDR))
    dev.process(p.RX)
    used = drv.drv[p.RX].used()
    # 3512 bytes with the header: three full buffers and 512 bytes in a fourth, in ring order
    assert used == [(heads[0], 1000), (heads[1], 1000), (heads[2], 1000), (heads[3], 512)]
    first = drv.mem.read(drv.rx_buffers[heads[0]][0][0], p.HDR_SIZE)
    assert p.NetHeader.unpack(first) == GSO_HDR.replace(num_buffers=4)
    data = b"".join(drv._read_buffers(drv.rx_buffers[h], n) for h, n in used)
    assert data[p.HDR_SIZE:] == frame


def test_small_frames_take_one_buffer_each(make_net):
    drv, dev, _ = make_net()
    drv.post_rx(4)
    frames = [payload(60 + i, i) for i in range(3)]
    for f in frames:
        dev.deliver(frame_item(f))
    got = drv.run_rx()
    assert [(h.num_buffers, d) for h, d, _ in got] == [(1, f) for f in frames]
    assert dev.stats["rx_frames"] == 3 and dev.stats["rx_bytes"] == sum(map(len, frames))


def test_buffers_made_of_several_descriptors(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    drv.post_rx(3, size=2000, split=3)
    frame = payload(4000)
    dev.deliver(frame_item(frame, GSO_HDR))
    [(hdr, data, n)] = drv.run_rx()
    assert n == 3 and hdr.num_buffers == 3 and data == frame


def test_a_frame_waits_until_enough_buffers_arrive(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    frame = payload(5000)
    dev.deliver(frame_item(frame, GSO_HDR))
    assert drv.run_rx() == [] and dev.pending() == 1
    drv.post_rx(2, size=1500)                   # 3000 bytes: not enough, the device keeps them
    assert drv.run_rx() == [] and dev.pending() == 1
    assert drv.drv[p.RX].in_flight == 2
    drv.post_rx(3, size=1500)
    [(hdr, data, n)] = drv.run_rx()
    assert data == frame and n == hdr.num_buffers == 4
    assert dev.pending() == 0 and drv.drv[p.RX].in_flight == 1


def test_all_buffers_of_a_frame_appear_with_one_used_idx_update():
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    drv = DriverQueue(mem, 8, GuestAllocator(mem, 0x1000))
    queue = SplitQueue(mem, 8, *drv.addresses, event_idx=False, indirect=False)
    for _ in range(5):
        drv.add([], [(0x8000, 16)])
    chains = [queue.pop() for _ in range(5)]
    queue.push(chains[0].head, 1)
    queue.push = None                            # push_many must not publish one by one
    queue.push_many([(c.head, 10 + i) for i, c in enumerate(chains[1:4])])
    assert drv.used_idx == 4 and queue.used_idx == 4
    assert drv.used() == [(chains[0].head, 1)] + [(c.head, 10 + i) for i, c in enumerate(chains[1:4])]
    with pytest.raises(ValueError):
        queue.push_many([(0, 1), (8, 1)])
    assert drv.used_idx == 4


def test_used_idx_wraps(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN, event_idx=False)
    frame = payload(2500)
    for round_ in range(140):                   # 280 used elements: past 0xFFFF is not needed,
        drv.post_rx(2, size=1500)               # but the ring (256) wraps
        dev.deliver(frame_item(frame, GSO_HDR))
        [(hdr, data, n)] = drv.run_rx()
        assert n == 2 and data == frame, round_
        drv.alloc.reset()


# -- without mergeable buffers -------------------------------------------------------------------

def test_without_mergeable_buffers_one_chain_per_frame(make_net):
    drv, dev, _ = make_net(features=NO_MRG)
    drv.post_rx(2, size=1530, split=2)
    frame = payload(1514)
    dev.deliver(frame_item(frame))
    [(hdr, data, n)] = drv.run_rx()
    assert data == frame and n == 1 and hdr.num_buffers == 1


def test_a_frame_larger_than_the_buffer_is_dropped_and_the_buffer_kept(make_net, caplog):
    drv, dev, _ = make_net(features=NO_MRG)
    drv.post_rx(1, size=600)
    dev.deliver(frame_item(payload(1000)))
    small = payload(500, 1)
    dev.deliver(frame_item(small))
    [(_, data, _)] = drv.run_rx()
    assert data == small                        # the 600-byte buffer went to the next frame
    assert dev.stats["rx_oversize"] == 1 and dev.pending() == 0
    assert any("rx_oversize" in r.getMessage() for r in caplog.records)


# -- oversize frames ------------------------------------------------------------------------------

def test_frames_above_the_mtu_are_dropped_and_counted(make_net, caplog):
    drv, dev, _ = make_net(mtu=1500)
    drv.post_rx(4, size=4096)
    dev.deliver(frame_item(payload(1518)))     # 1500 + Ethernet + a VLAN tag: fits
    dev.deliver(frame_item(payload(1519)))
    dev.deliver(frame_item(payload(9000)))
    got = drv.run_rx()
    assert [len(d) for _, d, _ in got] == [1518]
    assert dev.stats["rx_oversize"] == 2
    warnings = [r for r in caplog.records if "rx_oversize" in r.getMessage()]
    assert len(warnings) == 1 and "1519 bytes" in warnings[0].getMessage()   # logged once


def test_a_frame_larger_than_the_whole_ring_is_dropped(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    drv.post_rx(256, size=64)                   # 16 KiB in the whole ring
    dev.deliver(frame_item(payload(20000), GSO_HDR))
    small = payload(40)
    dev.deliver(frame_item(small))
    [(_, data, _)] = drv.run_rx()
    assert data == small and dev.stats["rx_oversize"] == 1


def test_runt_items_are_dropped(make_net):
    drv, dev, _ = make_net()
    drv.post_rx(2)
    dev.deliver(b"\0" * 11)
    dev.deliver(frame_item(b"\1" * 13))
    assert drv.run_rx() == [] and dev.stats["rx_errors"] == 2


# -- the pending queue -----------------------------------------------------------------------

def test_pending_queue_is_bounded_and_reports_space(make_net):
    drv, dev, backend = make_net()
    for i in range(PENDING_LIMIT):
        assert dev.deliver(frame_item(payload(60, i)))
    assert not dev.deliver(frame_item(payload(60))) and not dev.has_room()
    drv.post_rx(PENDING_LIMIT // 4)
    drv.run_rx()
    assert backend.space == 0                   # still more than half full
    drv.post_rx(PENDING_LIMIT // 2)
    got = drv.run_rx()
    assert backend.space == 1 and dev.has_room()
    assert len(got) == PENDING_LIMIT // 2


def test_deliver_wakes_the_receive_queue_once_per_batch(make_net):
    _, dev, _ = make_net()
    woken = []
    dev._wake = woken.append
    dev.deliver(frame_item(payload(60)))
    dev.deliver(frame_item(payload(60)))
    assert woken == [p.RX]


# -- control queue -------------------------------------------------------------------------------

def test_mac_addr_set(make_net):
    drv, dev, _ = make_net()
    new = bytes.fromhex("52540012345f")
    assert drv.control(p.CTRL_MAC, p.CTRL_MAC_ADDR_SET, new) == (p.CTRL_OK, 1)
    assert dev.config_bytes()[:6] == new
    assert drv.control(p.CTRL_MAC, p.CTRL_MAC_ADDR_SET, new[:5]) == (p.CTRL_ERR, 1)
    assert drv.control(p.CTRL_MAC, p.CTRL_MAC_ADDR_SET, b"\x01" + new[1:]) == (p.CTRL_ERR, 1)
    dev.reset()
    assert dev.config_bytes()[:6] == MAC        # a reset restores the configured address


@pytest.mark.parametrize("cls,cmd,data", [(0, 0, b"\1"), (1, 0, bytes(8)), (4, 0, b"\1\0"),
                                          (5, 0, bytes(8)), (99, 99, b"")])
def test_other_commands_are_refused(make_net, cls, cmd, data):
    drv, _, _ = make_net()
    assert drv.control(cls, cmd, data) == (p.CTRL_ERR, 1)


def test_mac_addr_set_needs_the_feature(make_net):
    drv, _, _ = make_net(features=BASE & ~p.bits(p.F_CTRL_MAC_ADDR))
    assert drv.control(p.CTRL_MAC, p.CTRL_MAC_ADDR_SET, bytes.fromhex("52540012345f"))[0] == p.CTRL_ERR


def test_control_chain_without_ack_byte(make_net):
    drv, dev, _ = make_net()
    out = drv.alloc.put(b"\1\1" + bytes(6))
    head = drv.drv[p.CTRL].add([(out, 8)], [])
    dev.process(p.CTRL)
    assert drv.drv[p.CTRL].used() == [(head, 0)]


# -- reset and activation ---------------------------------------------------------------------

def test_reset_forgets_pending_frames_and_held_buffers(make_net):
    drv, dev, backend = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    drv.post_rx(1, size=100)
    dev.deliver(frame_item(payload(3000), GSO_HDR))
    drv.run_rx()
    assert dev.pending() == 1 and len(dev._held) == 1
    dev.reset()
    assert dev.pending() == 0 and dev._held == [] and dev.driver_features == 0
    assert backend.configured[-1] == 0
    drv2 = NetDriver(dev)
    drv2.post_rx(1)
    dev.deliver(frame_item(payload(60)))
    assert len(drv2.run_rx()) == 1


def test_activate_tells_the_backend_and_wakes_for_waiting_frames(make_net):
    backend = FakeBackend()
    dev = VirtioNet(backend, mac=MAC)
    woken = []
    dev._wake = woken.append
    dev.deliver(frame_item(payload(60)))        # before the driver is up
    woken.clear()
    drv = NetDriver(dev)
    assert backend.configured == [drv.features] and woken == [p.RX]


def test_start_and_close_reach_the_backend(make_net):
    _, dev, backend = make_net()
    dev.start()
    dev.close()
    assert backend.started and backend.closed


# -- hostile rings -------------------------------------------------------------------------------

def test_receive_chain_of_readable_buffers_only_is_returned_empty(make_net):
    drv, dev, _ = make_net()
    bad = drv.drv[p.RX].add([(drv.alloc.alloc(64), 64)], [])
    good = drv.post_rx(1)[0]
    dev.deliver(frame_item(payload(60)))
    dev.process(p.RX)
    used = drv.drv[p.RX].used()
    assert used[0] == (bad, 0) and used[1][0] == good


def test_without_mergeable_buffers_a_readable_only_chain_is_returned_empty(make_net):
    drv, dev, _ = make_net(features=NO_MRG)
    bad = drv.drv[p.RX].add([(drv.alloc.alloc(64), 64)], [])
    good = drv.post_rx(1)[0]
    frame = payload(60)
    dev.deliver(frame_item(frame))
    dev.process(p.RX)
    used = drv.drv[p.RX].used()
    assert used == [(bad, 0), (good, p.HDR_SIZE + 60)]
    assert dev.pending() == 0 and dev.stats["rx_frames"] == 1


def test_garbage_rings_raise_only_virtqueue_errors(make_net):
    rng = random.Random(7)
    for round_ in range(30):
        drv, dev, backend = make_net(offloads=p.OFFLOADS)
        for q in range(3):
            d = drv.drv[q]
            for i in range(d.size):
                d.write_desc(i, rng.choice((rng.getrandbits(64), rng.randrange(0, 16 << 20))),
                             rng.choice((0, 1, 12, 100, 4096, rng.getrandbits(32))),
                             rng.getrandbits(4), rng.randrange(d.size + 2))
            for _ in range(rng.randrange(1, 8)):
                d.submit_head(rng.randrange(d.size + 2))
        for i in range(5):
            dev.deliver(frame_item(payload(rng.randrange(14, 3000), i),
                                   p.NetHeader(flags=rng.getrandbits(2), gso_type=rng.choice((0, 1, 3, 4, 0x81, 7)),
                                               csum_start=rng.getrandbits(16),
                                               csum_offset=rng.getrandbits(16))))
        for q in (p.RX, p.TX, p.CTRL, p.RX):
            try:
                dev.process(q)
            except VirtqueueError:
                pass
        for hdr, frame in backend.sent:       # whatever got out was checked
            assert len(frame) <= p.MAX_GSO_FRAME


def test_header_from_a_hostile_guest_cannot_reach_outside_its_chain(make_net):
    drv, dev, backend = make_net(offloads=p.bits(p.F_CSUM))
    hdr = p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, csum_start=0xFFF0, csum_offset=0xFFF0)
    drv.send(payload(100), hdr)
    assert backend.sent == [] and dev.stats["tx_errors"] == 1
