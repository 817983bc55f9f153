"""The multiport control protocol on its own: messages in, messages out."""
import pytest

from kvmkit_virtio_console import multiport as mp
from kvmkit_virtio_console.multiport import Message, Multiport, PortInfo, ProtocolError


def proto():
    return Multiport([PortInfo(0, console=True), PortInfo(1, "org.kvmkit.stdout"),
                      PortInfo(2, "org.kvmkit.stdin")])


def test_message_round_trip_and_layout():
    msg = Message(3, mp.PORT_NAME, 0, b"x.y")
    assert msg.encode() == bytes([3, 0, 0, 0, 7, 0, 0, 0]) + b"x.y"
    assert Message.decode(msg.encode()) == msg
    with pytest.raises(ProtocolError):
        Message.decode(b"\1\0\0")


def test_linux_start_up_sequence():
    p = proto()
    assert p.receive(Message(0, mp.DEVICE_READY, 1)) == [
        Message(0, mp.PORT_ADD, 1), Message(1, mp.PORT_ADD, 1), Message(2, mp.PORT_ADD, 1)]
    assert p.receive(Message(0, mp.PORT_READY, 1)) == [
        Message(0, mp.CONSOLE_PORT, 1), Message(0, mp.PORT_OPEN, 1)]
    assert p.receive(Message(1, mp.PORT_READY, 1)) == [
        Message(1, mp.PORT_NAME, 0, b"org.kvmkit.stdout"), Message(1, mp.PORT_OPEN, 1)]
    assert 0 in p.guest_open and 1 not in p.guest_open
    assert p.receive(Message(1, mp.PORT_OPEN, 1)) == [] and 1 in p.guest_open
    assert p.receive(Message(1, mp.PORT_OPEN, 0)) == [] and 1 not in p.guest_open


def test_device_ready_with_linux_bad_id():
    # Linux sends DEVICE_READY with id VIRTIO_CONSOLE_BAD_ID (~0): no port is meant.
    assert len(proto().receive(Message(0xFFFFFFFF, mp.DEVICE_READY, 1))) == 3


def test_repeats_are_answered_once():
    p = proto()
    p.receive(Message(0, mp.DEVICE_READY, 1))
    assert p.receive(Message(0, mp.DEVICE_READY, 1)) == []
    p.receive(Message(2, mp.PORT_READY, 1))
    assert p.receive(Message(2, mp.PORT_READY, 1)) == []


def test_host_hang_up_and_reconnect():
    p = proto()
    assert p.host_open(2, False) == []                # not announced yet: told with PORT_READY
    p.receive(Message(0, mp.DEVICE_READY, 1))
    assert p.receive(Message(2, mp.PORT_READY, 1)) == [Message(2, mp.PORT_NAME, 0, b"org.kvmkit.stdin")]
    assert p.host_open(2, True) == [Message(2, mp.PORT_OPEN, 1)]
    assert p.host_open(2, True) == []
    assert p.host_open(2, False) == [Message(2, mp.PORT_OPEN, 0)]


@pytest.mark.parametrize("msg", [
    Message(7, mp.PORT_READY, 1),          # no such port
    Message(0, mp.DEVICE_READY, 0),        # the driver failed
    Message(1, mp.PORT_READY, 0),
    Message(1, mp.CONSOLE_PORT, 1),        # a device-to-driver message
    Message(1, 999, 1),
])
def test_bad_messages_raise_and_change_nothing(msg):
    p = proto()
    with pytest.raises(ProtocolError):
        p.receive(msg)
    assert not p.device_ready and not p.guest_ready and not p.guest_open


def test_reset_announces_again():
    p = proto()
    p.receive(Message(0, mp.DEVICE_READY, 1))
    p.receive(Message(0, mp.PORT_READY, 1))
    p.reset()
    assert len(p.receive(Message(0, mp.DEVICE_READY, 1))) == 3
    assert p.receive(Message(0, mp.PORT_READY, 1))[0].event == mp.CONSOLE_PORT


def test_port_setup_is_checked():
    with pytest.raises(ValueError):
        Multiport([PortInfo(1)])
    with pytest.raises(ValueError):
        Multiport([PortInfo(0, console=True), PortInfo(1, console=True)])
    with pytest.raises(ValueError):
        PortInfo(0, "x" * 256)
