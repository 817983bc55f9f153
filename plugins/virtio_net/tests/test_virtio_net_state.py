"""virtio-net state for snapshots: receive buffers taken for an unfinished
frame go back to the ring, the guest-set MAC and the counters are kept."""
import json

from netdriver import MAC, FakeBackend, frame_item
from kvmkit.virtio.queue import SplitQueue
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net.net import VirtioNet
from test_virtio_net_rx import GSO_HDR, GSO_IN, payload

NEW_MAC = bytes.fromhex("525400abcdef")


def restored(drv, dev, **kw):
    """Save ``dev`` and its queues, and bring up a fresh model on the same rings."""
    state = dev.snapshot_state()
    indices = [q.save_indices() for q in drv.queues]
    json.loads(json.dumps([state, indices]))
    dev2 = VirtioNet(FakeBackend(**kw), mac=MAC, mtu=1500)
    queues = []
    for q, saved in zip(drv.queues, indices):
        q2 = SplitQueue(drv.mem, q.size, q.desc_addr, q.avail_addr, q.used_addr,
                        event_idx=q.event_idx, indirect=q.indirect)
        q2.restore_indices(saved)
        queues.append(q2)
    dev2.activate(queues, drv.features)
    dev2.restore_state(state)
    drv.dev, drv.queues = dev2, queues
    return dev2


def test_buffers_held_for_an_unfinished_frame_are_taken_again_after_restore(make_net):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=GSO_IN)
    first = drv.post_rx(2, size=1500)
    frame = payload(5000)
    dev.deliver(frame_item(frame, GSO_HDR))
    assert drv.run_rx() == [] and drv.drv[p.RX].in_flight == 2      # held by the device
    assert drv.queues[p.RX].last_avail_idx == 2
    dev2 = restored(drv, dev, offloads=p.GUEST_OFFLOADS)
    assert drv.queues[p.RX].last_avail_idx == 0                     # given back, not lost
    assert dev2.pending() == 0                                       # the frame: dropped
    dev2.deliver(frame_item(frame, GSO_HDR))                         # (the sender sends again)
    drv.post_rx(3, size=1500)
    used_before = drv.drv[p.RX].last_used_idx
    [(hdr, data, n)] = drv.run_rx()
    assert data == frame and n == hdr.num_buffers == 4
    assert drv.drv[p.RX].in_flight == 1
    slots = [(used_before + i) % drv.drv[p.RX].size for i in range(2)]
    heads = [int.from_bytes(drv.mem.read(drv.drv[p.RX].used_ring + 4 + 8 * s, 4), "little")
             for s in slots]
    assert heads == first                       # the buffers held at the save, first in the frame


def test_guest_set_mac_and_counters_survive(make_net):
    drv, dev, _ = make_net(features=VirtioNet.BASE_FEATURES | p.bits(p.F_CTRL_MAC_ADDR))
    drv.post_rx(1)
    dev.deliver(frame_item(payload(100)))
    drv.run_rx()
    assert drv.control(p.CTRL_MAC, p.CTRL_MAC_ADDR_SET, NEW_MAC)[0] == p.CTRL_OK
    dev2 = restored(drv, dev)
    assert dev2.mac == NEW_MAC and dev2.config_bytes()[:6] == NEW_MAC
    assert dev2.stats["rx_frames"] == 1 and dev2.stats["rx_bytes"] == 100
    drv.post_rx(1)
    dev2.deliver(frame_item(payload(80, 1)))
    [(_, data, _)] = drv.run_rx()
    assert data == payload(80, 1) and dev2.stats["rx_frames"] == 2
