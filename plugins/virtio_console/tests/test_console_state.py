"""virtio-console state for snapshots: the control-queue conversation, input
not yet delivered and deferred hang-ups survive; a host end that is
(dis)connected unlike at the save is announced."""
import json

from kvmkit.virtio.queue import SplitQueue
from kvmkit_virtio_console import multiport as mp
from kvmkit_virtio_console.console import PortSetup, VirtioConsole, rx_index, tx_index
from kvmkit_virtio_console.multiport import Message
from test_console_device import Sink, control, make, receive_control, start


def restore_into(drv, dev2):
    """Save the driven model and its queues; bring ``dev2`` up on the same rings."""
    dev = drv.device
    state = dev.snapshot_state()
    indices = [q.save_indices() for q in drv.device_queues]
    json.loads(json.dumps(state))
    queues = []
    for q, saved in zip(drv.device_queues, indices):
        q2 = SplitQueue(drv.memory, q.size, q.desc_addr, q.avail_addr, q.used_addr,
                        event_idx=q.event_idx, indirect=q.indirect)
        q2.restore_indices(saved)
        queues.append(q2)
    dev2.activate(queues, drv.features)
    dev2.restore_state(state)
    drv.device, drv.device_queues = dev2, queues


def test_conversation_pending_input_and_hang_up_survive(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    start(drv, 0, 1)
    control(drv, Message(1, mp.PORT_OPEN, 1))
    dev.feed(1, b"last words")
    dev.host_connected(1, False)                       # deferred behind the input
    dev2, sinks2, _ = make(ports=1)
    restore_into(drv, dev2)
    assert control(drv, Message(0, mp.DEVICE_READY, 1)) == []     # already ready: no PORT_ADDs again
    req = drv.submit(rx_index(1), writable=[64])
    assert drv.notify(rx_index(1)) == [(req.head, 10)] and drv.written(req, 10) == b"last words"
    assert receive_control(drv) == [Message(1, mp.PORT_OPEN, 0)]
    drv.submit(tx_index(0), readable=[b"after"])
    drv.notify(tx_index(0))
    assert bytes(sinks2[0].data) == b"after"


def test_a_host_end_missing_after_restore_is_announced(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    start(drv, 0, 1)
    receive_control(drv)
    dev2 = VirtioConsole([PortSetup("", True, Sink()),
                          PortSetup("port1", False, Sink(), connected=False)])
    restore_into(drv, dev2)
    assert receive_control(drv) == [Message(1, mp.PORT_OPEN, 0)]
