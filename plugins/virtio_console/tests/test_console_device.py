"""VirtioConsole driven by kvmkit.testing's virtio driver (the guest side)."""
import struct

import pytest

from kvmkit_virtio_console import console as c
from kvmkit_virtio_console import multiport as mp
from kvmkit_virtio_console.console import (CONTROL_RX, CONTROL_TX, PortSetup, VirtioConsole,
                                           rx_index, tx_index)
from kvmkit_virtio_console.multiport import Message


class Sink:
    def __init__(self, limit=1 << 20):
        self.data = bytearray()
        self.limit = limit

    def room(self):
        return self.limit - len(self.data)

    def write(self, data):
        self.data += data


class Woken(list):
    pass


def make(ports=2, **kw):
    sinks = [Sink() for _ in range(ports + 1)]
    setups = [PortSetup("", True, sinks[0])] + [PortSetup(f"port{i}", False, sinks[i])
                                                 for i in range(1, ports + 1)]
    dev = VirtioConsole(setups, **kw)
    woken = Woken()
    dev._wake = woken.append
    return dev, sinks, woken


def control(drv, *msgs):
    """The driver sends ``msgs``; returns what the device answers (decoded)."""
    for m in msgs:
        drv.submit(CONTROL_TX, readable=[m.encode()])
    drv.notify(CONTROL_TX)
    return receive_control(drv)


def receive_control(drv, buffers=8):
    """Keep ``buffers`` receive buffers posted; decode what the device put in them."""
    posted = drv.__dict__.setdefault("control_posted", {})
    while len(posted) < buffers:
        r = drv.submit(CONTROL_RX, writable=[64])
        posted[r.head] = r
    out = []
    for head, n in drv.notify(CONTROL_RX):
        out.append(Message.decode(drv.written(posted.pop(head), n)))
    return out


def start(drv, *ports):
    answers = control(drv, Message(0, mp.DEVICE_READY, 1))
    for p in ports:
        answers += control(drv, Message(p, mp.PORT_READY, 1))
    return answers


def test_identity_and_config():
    dev, _, _ = make(ports=2)
    assert (dev.device_id, dev.pci_class) == (3, 0x078000)
    assert dev.features == 1 << c.F_MULTIPORT
    assert len(dev.queue_sizes) == 8 and (rx_index(0), tx_index(0), rx_index(1), tx_index(2)) == (0, 1, 4, 7)
    assert struct.unpack("<HHII", dev.config_bytes()) == (0, 0, 3, 0)


def test_start_up_names_the_ports(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    assert start(drv, 0, 1) == [
        Message(0, mp.PORT_ADD, 1), Message(1, mp.PORT_ADD, 1),
        Message(0, mp.CONSOLE_PORT, 1), Message(0, mp.PORT_OPEN, 1),
        Message(1, mp.PORT_NAME, 0, b"port1"), Message(1, mp.PORT_OPEN, 1)]


def test_console_and_port_output_reach_their_sinks(virtqueue_driver):
    dev, sinks, _ = make(ports=2)
    drv = virtqueue_driver(dev)
    start(drv, 0, 1, 2)
    drv.submit(tx_index(0), readable=[b"hello ", b"console"])
    assert len(drv.notify(tx_index(0))) == 1
    drv.submit(tx_index(2), readable=[b"err"])
    drv.notify(tx_index(2))
    assert (bytes(sinks[0].data), bytes(sinks[1].data), bytes(sinks[2].data)) == \
        (b"hello console", b"", b"err")


def test_a_full_sink_leaves_output_in_the_ring(virtqueue_driver):
    dev, sinks, _ = make(ports=1)
    sinks[1].limit = 4
    drv = virtqueue_driver(dev)
    start(drv, 1)
    for chunk in (b"abc", b"def", b"ghi"):
        drv.submit(tx_index(1), readable=[chunk])
    assert len(drv.notify(tx_index(1))) == 2           # room for 4: two chains taken
    assert bytes(sinks[1].data) == b"abcdef"
    sinks[1].limit = 100
    dev.output_ready(1)                                 # the sink drained: it asks for a wake
    assert len(drv.notify(tx_index(1))) == 1
    assert bytes(sinks[1].data) == b"abcdefghi"


def test_input_waits_for_the_guest_to_open_the_port(virtqueue_driver):
    dev, _, woken = make(ports=1)
    drv = virtqueue_driver(dev)
    start(drv, 1)
    dev.feed(1, b"typed")
    assert rx_index(1) in woken
    req = drv.submit(rx_index(1), writable=[16])
    assert drv.notify(rx_index(1)) == []               # Linux drops data for a closed port
    assert control(drv, Message(1, mp.PORT_OPEN, 1)) == []
    assert drv.notify(rx_index(1)) == [(req.head, 5)] and drv.written(req, 5) == b"typed"
    assert dev.input_room(1) == c.INPUT_LIMIT


def test_input_is_split_over_small_buffers(virtqueue_driver):
    dev, _, _ = make(ports=0)
    drv = virtqueue_driver(dev)
    start(drv, 0)
    dev.feed(0, b"0123456789")
    reqs = [drv.submit(rx_index(0), writable=[4]) for _ in range(2)]
    assert [n for _, n in drv.notify(rx_index(0))] == [4, 4]
    assert b"".join(drv.written(r) for r in reqs) == b"01234567"
    assert dev.input_room(0) == c.INPUT_LIMIT - 2
    req = drv.submit(rx_index(0), writable=[4])
    assert drv.notify(rx_index(0)) == [(req.head, 2)]


def test_hang_up_comes_after_the_pending_input(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    start(drv, 1)
    control(drv, Message(1, mp.PORT_OPEN, 1))
    dev.feed(1, b"last words")
    dev.host_connected(1, False)
    assert receive_control(drv) == []                   # not yet: the input is still pending
    drv.submit(rx_index(1), writable=[64])
    drv.notify(rx_index(1))
    assert receive_control(drv) == [Message(1, mp.PORT_OPEN, 0)]


def test_control_messages_wait_for_receive_buffers(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    drv.submit(CONTROL_TX, readable=[Message(0, mp.DEVICE_READY, 1).encode()])
    drv.notify(CONTROL_TX)
    assert len(receive_control(drv, buffers=1)) == 1
    assert len(receive_control(drv, buffers=4)) == 1


def test_bad_control_messages_are_counted_not_fatal(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    assert control(drv, Message(9, mp.PORT_READY, 1)) == []
    drv.submit(CONTROL_TX, readable=[b"\1"])
    drv.notify(CONTROL_TX)
    assert dev.control_errors == 2
    assert len(start(drv, 1)) == 4                       # still answers a proper driver


def test_the_control_backlog_is_bounded(virtqueue_driver):
    dev, _, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    control(drv, Message(0, mp.DEVICE_READY, 1))
    for _ in range(c.CONTROL_BACKLOG + 50):             # a driver that never reads replies
        dev.protocol.guest_ready.discard(1)
        drv.submit(CONTROL_TX, readable=[Message(1, mp.PORT_READY, 1).encode()])
        drv.notify(CONTROL_TX)
    assert len(dev._control_out) == c.CONTROL_BACKLOG and dev.control_dropped > 0


def test_a_huge_output_chain_is_cut(virtqueue_driver, monkeypatch):
    monkeypatch.setattr(c, "CHAIN_LIMIT", 8)
    dev, sinks, _ = make(ports=0)
    drv = virtqueue_driver(dev)
    drv.submit(tx_index(0), readable=[b"0123456789abcdef"])
    drv.notify(tx_index(0))
    assert bytes(sinks[0].data) == b"01234567" and dev.ports[0].dropped_out == 8


def test_reset_delivers_output_already_queued(virtqueue_driver):
    dev, sinks, _ = make(ports=1)
    drv = virtqueue_driver(dev)
    start(drv, 1)
    drv.submit(tx_index(1), readable=[b"exit 7\n"])     # queued, the VM ends before the worker runs
    dev.reset()
    assert bytes(sinks[1].data) == b"exit 7\n" and dev.queues == []


def test_without_multiport_port0_is_a_plain_console(virtqueue_driver):
    dev, sinks, _ = make(ports=0)
    drv = virtqueue_driver(dev, features=1 << 32)       # VERSION_1 only
    drv.submit(tx_index(0), readable=[b"early"])
    drv.notify(tx_index(0))
    dev.feed(0, b"in")
    req = drv.submit(rx_index(0), writable=[8])
    assert drv.notify(rx_index(0)) == [(req.head, 2)] and bytes(sinks[0].data) == b"early"


def test_bad_setups():
    with pytest.raises(ValueError):
        VirtioConsole([])
    with pytest.raises(ValueError):
        VirtioConsole([PortSetup(), PortSetup("a")], multiport=False)
    with pytest.raises(ValueError):
        VirtioConsole([PortSetup(), PortSetup("a", console=True)])
