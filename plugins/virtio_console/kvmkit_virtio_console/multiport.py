"""The virtio console's multiport control protocol (virtio 1.2, 5.3.6.2),
device side, as a pure state machine: messages in, messages out.

It knows nothing of virtqueues: the device model feeds it what the driver
wrote on the control transmit queue (:meth:`Multiport.receive`) and the
host-side events (:meth:`Multiport.host_open`), and puts what comes back on
the control receive queue.  So it can be driven by tests, or by any other
transport, byte for byte.

The exchange with a Linux driver:

    driver  DEVICE_READY(1)          ->  (Linux's id: VIRTIO_CONSOLE_BAD_ID, ~0)
            <- PORT_ADD(id)           for every port
    driver  PORT_READY(id, 1)        ->
            <- CONSOLE_PORT(id, 1)    the port becomes hvc<n>
            <- PORT_NAME(id) + name   /sys/class/virtio-ports/vportXpY/name
            <- PORT_OPEN(id, 1)       the host end is connected
    driver  PORT_OPEN(id, 1|0)       ->  guest program opened / closed the port
            <- PORT_OPEN(id, 0)       the host end hung up: reads give EOF
"""
from __future__ import annotations

import dataclasses
import struct

__all__ = ["DEVICE_READY", "PORT_ADD", "PORT_REMOVE", "PORT_READY", "CONSOLE_PORT", "RESIZE",
           "PORT_OPEN", "PORT_NAME", "EVENT_NAMES", "Message", "ProtocolError", "PortInfo",
           "Multiport", "HEADER_SIZE", "NAME_LIMIT"]

DEVICE_READY = 0
PORT_ADD = 1            # the spec's VIRTIO_CONSOLE_DEVICE_ADD
PORT_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7

EVENT_NAMES = {DEVICE_READY: "DEVICE_READY", PORT_ADD: "PORT_ADD", PORT_REMOVE: "PORT_REMOVE",
               PORT_READY: "PORT_READY", CONSOLE_PORT: "CONSOLE_PORT", RESIZE: "RESIZE",
               PORT_OPEN: "PORT_OPEN", PORT_NAME: "PORT_NAME"}

_HEADER = struct.Struct("<IHH")          # le32 id, le16 event, le16 value
HEADER_SIZE = _HEADER.size
NAME_LIMIT = 255                          # bytes of a port name (Linux reads at most a page)


class ProtocolError(ValueError):
    """The driver sent something the protocol does not allow."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One ``struct virtio_console_control`` and what follows it (a port name)."""

    id: int
    event: int
    value: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return _HEADER.pack(self.id, self.event, self.value) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> "Message":
        if len(data) < HEADER_SIZE:
            raise ProtocolError(f"control message of {len(data)} bytes; it takes {HEADER_SIZE}")
        port, event, value = _HEADER.unpack_from(data)
        return cls(port, event, value, bytes(data[HEADER_SIZE:]))

    def __str__(self) -> str:
        name = EVENT_NAMES.get(self.event, f"event {self.event}")
        extra = f" {self.payload.decode('ascii', 'replace')!r}" if self.payload else ""
        return f"{name}(port {self.id}, {self.value}){extra}"


@dataclasses.dataclass(frozen=True)
class PortInfo:
    """What the protocol needs to know of a port."""

    id: int
    name: str = ""            # "" : no PORT_NAME is sent
    console: bool = False     # announced with CONSOLE_PORT (the guest's hvc console)

    def __post_init__(self) -> None:
        raw = self.name.encode("utf-8")
        if len(raw) > NAME_LIMIT or "\0" in self.name:
            raise ValueError(f"port name {self.name!r}: at most {NAME_LIMIT} bytes, no NUL")


class Multiport:
    """Device side of the control protocol for a fixed set of ports.

    ``receive`` takes one message from the driver and returns the messages
    to send back (possibly none).  A message that names an unknown port or
    event raises :class:`ProtocolError` and changes nothing; the caller
    decides what a misbehaving driver costs it.
    """

    def __init__(self, ports: list[PortInfo]):
        ids = [p.id for p in ports]
        if sorted(ids) != list(range(len(ids))):
            raise ValueError(f"port ids must be 0..{len(ids) - 1}, got {ids}")
        if sum(p.console for p in ports) > 1:
            raise ValueError("at most one console port")
        self.ports = {p.id: p for p in ports}
        self.device_ready = False                       # the driver sent DEVICE_READY(1)
        self.guest_ready: set[int] = set()              # PORT_READY(id, 1) seen
        self.guest_open: set[int] = set()               # the guest holds the port open
        self.host_connected = {p.id: True for p in ports}

    def reset(self) -> None:
        """The driver reset the device: everything is announced again."""
        self.device_ready = False
        self.guest_ready.clear()
        self.guest_open.clear()

    def receive(self, msg: Message) -> list[Message]:
        if msg.event == DEVICE_READY:                   # Linux sends it with id 0xffffffff
            if msg.value != 1:
                raise ProtocolError("the driver failed to set up the device (DEVICE_READY 0)")
            if self.device_ready:
                return []
            self.device_ready = True
            return [Message(p, PORT_ADD, 1) for p in sorted(self.ports)]
        port = self.ports.get(msg.id)
        if port is None:
            raise ProtocolError(f"{msg}: no such port (the device has {len(self.ports)})")
        if msg.event == PORT_READY:
            if msg.value != 1:
                raise ProtocolError(f"{msg}: the driver could not add the port")
            if port.id in self.guest_ready:
                return []
            self.guest_ready.add(port.id)
            out = []
            if port.console:
                out.append(Message(port.id, CONSOLE_PORT, 1))
                self.guest_open.add(port.id)            # Linux's hvc holds it open
            if port.name:
                out.append(Message(port.id, PORT_NAME, 0, port.name.encode("utf-8")))
            if self.host_connected[port.id]:
                out.append(Message(port.id, PORT_OPEN, 1))
            return out
        if msg.event == PORT_OPEN:
            if msg.value:
                self.guest_open.add(port.id)
            else:
                self.guest_open.discard(port.id)
            return []
        raise ProtocolError(f"{msg}: not a message a driver sends")

    def host_open(self, port_id: int, connected: bool) -> list[Message]:
        """The host end of ``port_id`` connected or hung up."""
        if self.host_connected[port_id] == connected:
            return []
        self.host_connected[port_id] = connected
        if port_id not in self.guest_ready:             # told with PORT_READY later
            return []
        return [Message(port_id, PORT_OPEN, int(connected))]
