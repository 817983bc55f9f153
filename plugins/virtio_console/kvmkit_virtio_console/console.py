"""The virtio console device (virtio 1.2, section 5.3) as a state machine.

Port 0 is the console (the guest's ``hvc0``); ports 1.. are named ports
(``/dev/vport0pN``, named in ``/sys/class/virtio-ports/vport0pN/name``).
With VIRTIO_CONSOLE_F_MULTIPORT the driver and the device talk over two
control queues (:mod:`.multiport`); without it there is only port 0.

Queues: 0/1 port 0 receive/transmit, 2/3 control receive/transmit, then
4/5 port 1, 6/7 port 2, ...

Each port's host end is an output sink (``room()``, ``write(data)``, or
None to discard) and input given through :meth:`VirtioConsole.feed`.  The
device never blocks: guest output is taken from the transmit queue only
while the sink has room (the rest waits in the ring, so a guest writing
faster than the host reads is slowed down, not cut short) and the sink
calls ``wake(tx_index(port))`` when it has room again.  Host input waits in
a bounded buffer until the guest posts receive buffers and has the port
open (Linux drops data for a port no program holds open).
"""
from __future__ import annotations

import dataclasses
import logging
import struct
from typing import Callable, Protocol, Sequence

from kvmkit.plugin_api import VirtioDevice

from . import multiport as mp

__all__ = ["VirtioConsole", "PortSetup", "OutputSink", "rx_index", "tx_index",
           "CONTROL_RX", "CONTROL_TX", "F_SIZE", "F_MULTIPORT", "F_EMERG_WRITE",
           "INPUT_LIMIT", "CHAIN_LIMIT", "CONTROL_BACKLOG"]

F_SIZE = 0
F_MULTIPORT = 1
F_EMERG_WRITE = 2

CONTROL_RX = 2
CONTROL_TX = 3
QUEUE_SIZE = 128
INPUT_LIMIT = 64 * 1024          # host input held for a port before readers wait
CHAIN_LIMIT = 64 * 1024          # guest output taken from one chain; the rest is dropped
CONTROL_BACKLOG = 256            # control messages waiting for receive buffers


def rx_index(port: int) -> int:
    return 0 if port == 0 else 2 * (port + 1)


def tx_index(port: int) -> int:
    return rx_index(port) + 1


class OutputSink(Protocol):
    def room(self) -> int:
        """How many bytes the sink takes now without blocking (0: full)."""

    def write(self, data: bytes) -> None:
        """Take ``data`` (never blocks; at most a chain beyond ``room()``)."""


@dataclasses.dataclass
class PortSetup:
    """One port as configured: its protocol identity and its host output."""

    name: str = ""
    console: bool = False
    out: OutputSink | None = None       # None: guest output is discarded
    connected: bool = True              # the host end is there from the start


class _Port:
    def __init__(self, pid: int, setup: PortSetup):
        self.id = pid
        self.setup = setup
        self.pending = bytearray()       # host input not yet in guest buffers
        self.bytes_out = 0
        self.bytes_in = 0
        self.dropped_out = 0


class VirtioConsole(VirtioDevice):
    device_id = 3
    pci_class = 0x078000                 # communication controller, other

    def __init__(self, ports: Sequence[PortSetup], *, multiport: bool = True,
                 queue_size: int = QUEUE_SIZE, log: logging.Logger | None = None,
                 on_input_room: Callable[[int], None] | None = None):
        super().__init__()
        if not ports:
            raise ValueError("a virtio console has at least one port")
        if not multiport and len(ports) > 1:
            raise ValueError("named ports need multiport")
        if any(p.console for p in ports[1:]):
            raise ValueError("only port 0 can be the console")
        self.ports = [_Port(i, p) for i, p in enumerate(ports)]
        self.features = 1 << F_MULTIPORT if multiport else 0
        self.queue_sizes = (queue_size,) * (2 * (len(ports) + 1) if multiport else 2)
        self.protocol = mp.Multiport([mp.PortInfo(i, p.name, p.console) for i, p in enumerate(ports)])
        for p in self.ports:
            self.protocol.host_connected[p.id] = p.setup.connected
        self.log = log or logging.getLogger(__name__)
        self.on_input_room = on_input_room
        self._control_out: list[bytes] = []
        self._hangups: set[int] = set()      # host ends that hung up with input still pending
        self.control_errors = 0
        self.control_dropped = 0

    # -- configuration space: struct virtio_console_config -------------------------------
    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 0, 0, len(self.ports), 0)

    # -- lifecycle --------------------------------------------------------------------------
    @property
    def _multiport(self) -> bool:
        return self.negotiated(F_MULTIPORT)

    def activate(self, queues: list, driver_features: int) -> None:
        super().activate(queues, driver_features)
        self.protocol.reset()
        self._control_out.clear()
        if not self._multiport:              # port 0 alone, a console, always open
            self.protocol.guest_open.add(0)

    def reset(self) -> None:
        """Output the driver already queued is still delivered (the guest
        handed it over before the reset, or before the VM ended)."""
        if self.queues:
            for p in self.ports:
                q = self._queue(tx_index(p.id))
                if q is not None:
                    try:
                        self._transmit(p, q, limit=False)
                    except Exception as e:               # a broken ring: nothing more to save
                        self.log.debug("port %d: draining at reset: %s", p.id, e)
        super().reset()
        self.protocol.reset()
        self._control_out.clear()

    def _queue(self, index: int):
        if index < len(self.queues):
            return self.queues[index]
        return None

    def _active(self, port: _Port) -> bool:
        return port.id == 0 or self._multiport

    # -- host side (called with the device lock held) ---------------------------------------
    def input_room(self, port: int) -> int:
        return max(INPUT_LIMIT - len(self.ports[port].pending), 0)

    def feed(self, port: int, data: bytes) -> None:
        """Host input for ``port``; the guest gets it in its receive buffers."""
        self.ports[port].pending += data
        self.wake(rx_index(port))

    def host_connected(self, port: int, connected: bool) -> None:
        """The host end of ``port`` connected or hung up.  A hang-up reaches
        the guest (as end-of-file) only after the input before it."""
        p = self.ports[port]
        if not connected and p.pending:
            self._hangups.add(port)
            return
        self._hangups.discard(port)
        self._send(self.protocol.host_open(port, connected))

    def output_ready(self, port: int) -> None:
        """The sink of ``port`` has room again: take more guest output
        (safe from any thread, with or without the lock)."""
        self.wake(tx_index(port))

    # -- the data path ----------------------------------------------------------------------
    # Used buffers go back only from process(index) of their own queue, after
    # which the transport interrupts the driver; work for another queue is
    # handed over with wake(index).
    def process(self, index: int) -> None:
        q = self._queue(index)
        if q is None:
            return
        if self._multiport and index == CONTROL_TX:
            self._serve_control_tx(q)
        elif self._multiport and index == CONTROL_RX:
            self._flush_control()
        else:
            port_id = 0 if index < 2 else index // 2 - 1
            if port_id >= len(self.ports) or not self._active(self.ports[port_id]):
                return
            if index & 1:
                self._serve_tx(self.ports[port_id], q)
            else:
                self._deliver(self.ports[port_id])

    def _serve_tx(self, port: _Port, q) -> None:
        while True:
            q.disable_notifications()
            more = self._transmit(port, q)
            if more or not q.enable_notifications():
                return

    def _transmit(self, port: _Port, q, limit: bool = True) -> bool:
        """Move chains to the sink while it has room; True if it filled up."""
        sink = port.setup.out
        while True:
            if limit and sink is not None and sink.room() <= 0:
                return True
            chain = q.pop()
            if chain is None:
                return False
            n = min(chain.readable_len, CHAIN_LIMIT)
            if n < chain.readable_len:
                port.dropped_out += chain.readable_len - n
                self.log.warning("port %d: a %d-byte output chain; kept the first %d",
                                 port.id, chain.readable_len, n)
            data = chain.read(q.memory, 0, n) if n else b""
            port.bytes_out += len(data)
            if sink is not None and data:
                sink.write(data)
            q.push(chain.head, 0)

    def _deliver(self, port: _Port) -> None:
        """Move pending host input into the port's receive buffers."""
        q = self._queue(rx_index(port.id))
        if q is None or not self._active(port) or port.id not in self.protocol.guest_open:
            return
        before = len(port.pending)
        while port.pending:
            chain = q.pop()
            if chain is None:
                break
            n = min(chain.writable_len, len(port.pending))
            if n:
                chain.write(q.memory, 0, port.pending[:n])
                del port.pending[:n]
                port.bytes_in += n
            q.push(chain.head, n)
        if port.id in self._hangups and not port.pending:
            self._hangups.discard(port.id)
            self._send(self.protocol.host_open(port.id, False))
        if len(port.pending) < before and self.on_input_room is not None:
            self.on_input_room(port.id)

    # -- control queues ----------------------------------------------------------------------
    def _serve_control_tx(self, q) -> None:
        while (chain := q.pop()) is not None:
            n = min(chain.readable_len, mp.HEADER_SIZE + mp.NAME_LIMIT)
            data = chain.read(q.memory, 0, n)
            q.push(chain.head, 0)
            try:
                msg = mp.Message.decode(data)
                self._send(self.protocol.receive(msg))
            except mp.ProtocolError as e:
                self.control_errors += 1
                if self.control_errors <= 8:
                    self.log.warning("control queue: %s", e)
                continue
            if msg.event == mp.PORT_OPEN:         # -v shows the guest's progress, with times
                self.log.info("port %s: %s by the guest", self.ports[msg.id].setup.name or "hvc0",
                              "opened" if msg.value else "closed")
            elif msg.event == mp.DEVICE_READY:
                self.log.info("driver ready")
            if msg.event in (mp.PORT_OPEN, mp.PORT_READY) and self.ports[msg.id].pending:
                self.wake(rx_index(msg.id))                   # input that waited for a reader

    def _send(self, messages: list) -> None:
        for msg in messages:
            if len(self._control_out) >= CONTROL_BACKLOG:
                self.control_dropped += 1
                continue
            self._control_out.append(msg.encode())
        if messages:
            self.wake(CONTROL_RX)

    def _flush_control(self) -> None:
        q = self._queue(CONTROL_RX)
        if q is None:
            return
        while self._control_out:
            chain = q.pop()
            if chain is None:
                return
            data = self._control_out[0]
            n = min(len(data), chain.writable_len)
            if n < len(data):
                self.control_errors += 1       # a receive buffer too short for the message
            chain.write(q.memory, 0, data[:n])
            q.push(chain.head, n)
            del self._control_out[0]

    # -- snapshots (kvmkit.device_state) ------------------------------------------------------
    # Kept: what the driver and the device told each other over the control
    # queues (ready, ports added and opened, messages not yet delivered), host
    # input not yet in guest buffers, the counters.  The host end is the
    # restored VM's own: where it is (dis)connected unlike at the save, the
    # guest is told so, as when it connects or hangs up.
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        proto = self.protocol
        return {"version": self.STATE_VERSION,
                "device_ready": proto.device_ready,
                "guest_ready": sorted(proto.guest_ready), "guest_open": sorted(proto.guest_open),
                "host_connected": [proto.host_connected[p.id] for p in self.ports],
                "control_out": [m.hex() for m in self._control_out],
                "hangups": sorted(self._hangups),
                "control_errors": self.control_errors, "control_dropped": self.control_dropped,
                "ports": [{"pending": bytes(p.pending).hex(), "bytes_out": p.bytes_out,
                           "bytes_in": p.bytes_in, "dropped_out": p.dropped_out}
                          for p in self.ports]}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"virtio-console state version {state.get('version')!r}; this "
                             f"plugin reads version {self.STATE_VERSION}")
        if len(state["ports"]) != len(self.ports):
            raise ValueError(f"virtio-console state has {len(state['ports'])} ports, the device "
                             f"has {len(self.ports)}")
        proto = self.protocol
        known = set(proto.ports)
        actual = dict(proto.host_connected)             # this VM's host ends, as they are now
        proto.device_ready = bool(state["device_ready"])
        proto.guest_ready = {int(i) for i in state["guest_ready"]} & known
        proto.guest_open = {int(i) for i in state["guest_open"]} & known
        for port, connected in zip(self.ports, state["host_connected"]):
            proto.host_connected[port.id] = bool(connected)
        self._control_out = [bytes.fromhex(m) for m in state["control_out"]][:CONTROL_BACKLOG]
        self._hangups = {int(i) for i in state["hangups"]} & known
        self.control_errors = int(state["control_errors"])
        self.control_dropped = int(state["control_dropped"])
        for port, saved in zip(self.ports, state["ports"]):
            port.pending = bytearray.fromhex(saved["pending"])[:INPUT_LIMIT]
            port.bytes_out, port.bytes_in = int(saved["bytes_out"]), int(saved["bytes_in"])
            port.dropped_out = int(saved["dropped_out"])
        for port in self.ports:
            if actual[port.id] != proto.host_connected[port.id]:
                self.host_connected(port.id, actual[port.id])
        if self._control_out:
            self.wake(CONTROL_RX)
        for port in self.ports:
            if port.pending:
                self.wake(rx_index(port.id))

    # -- for logs ----------------------------------------------------------------------------
    def stats(self) -> dict:
        return {p.setup.name or f"port{p.id}": {"out": p.bytes_out, "in": p.bytes_in,
                                                  "dropped_out": p.dropped_out}
                for p in self.ports}
