"""The virtio-net device model (virtio 1.2, section 5.1).

A state machine between the guest's queues and a backend (user-mode
networking or a tap, :mod:`kvmkit_virtio_net.backends`):

``transmit`` (queue 1)  every chain the driver makes available is one frame
                        behind a 12-byte header; it is checked against the
                        negotiated features and handed to the backend.
``receive`` (queue 0)   the backend's frames wait in a bounded queue (any
                        thread may add to it) until ``process(0)`` copies
                        them into the driver's receive buffers, several per
                        frame with VIRTIO_NET_F_MRG_RXBUF.
``control`` (queue 2)   VIRTIO_NET_CTRL_MAC_ADDR_SET; anything else is
                        answered VIRTIO_NET_ERR.

Frames are never cut short.  A frame larger than the other side accepts
(the MTU, or 64 KiB with GSO, or the driver's buffer without mergeable
buffers) is dropped and counted; so are frames with headers that ask for an
offload nobody negotiated.  The first drop of each kind is logged;
:attr:`VirtioNet.stats` holds the counters.

The device never filters by destination address (it offers no
VIRTIO_NET_F_CTRL_RX): it delivers what the backend gives it.

When the queue backend offers ``net_tx_engine`` (kvmkit-native) and the
backend is a tap, the transmit queue runs on that engine's C thread instead
of ``process(1)``: kicks, the header checks, the writev() to the tap and the
interrupts never reach Python.  The chains the engine does not send (runts,
bad or unnegotiated offloads, oversize frames, frames the tap refused) come
back through ``_send``, which counts and logs them as it does on the Python
path (a refused frame is written once more first); :attr:`stats` adds the
running engine's counters to the model's.
"""
from __future__ import annotations

import collections
import logging
import threading

from kvmkit.plugin_api import GuestLog, VirtioDevice

from . import protocol as p
from .checksum import complete_checksum
from .mac import format_mac

__all__ = ["VirtioNet", "QUEUE_SIZES", "PENDING_LIMIT", "STAT_NAMES"]

QUEUE_SIZES = (256, 256, 64)        # rx, tx, ctrl
PENDING_LIMIT = 256                 # frames from the backend waiting for receive buffers

_PLAIN = p.NetHeader()                # a frame without offloads

STAT_NAMES = (
    "rx_frames", "rx_bytes", "tx_frames", "tx_bytes",
    "rx_oversize",      # larger than the guest takes (MTU, 64 KiB, its buffer)
    "rx_dropped",       # the guest had no room: the pending queue was full
    "rx_errors",        # a header from the backend with an offload the guest did not negotiate
    "tx_oversize",      # larger than the MTU (or 64 KiB with GSO)
    "tx_errors",        # a malformed frame or header, or the backend failed to send it
)

_WHY = {
    "rx_oversize": "a frame from the host larger than the guest accepts was dropped",
    "rx_dropped": "a frame from the host was dropped: the guest had no receive buffers",
    "rx_errors": "a frame from the host with an offload the guest did not negotiate was dropped",
    "tx_oversize": "a frame from the guest larger than the MTU allows was dropped",
    "tx_errors": "a frame from the guest was dropped",
}


def _engine_counts(engine) -> dict[str, int]:
    """A transmit engine's counters under the model's names (a chain it had to
    return unsent, with more outstanding than the queue holds, is a tx error)."""
    counts = engine.stats()
    return {"tx_frames": counts["tx_frames"], "tx_bytes": counts["tx_bytes"],
            "tx_errors": counts["dropped"]}


class VirtioNet(VirtioDevice):
    """A virtio network device on ``backend`` with Ethernet address ``mac``
    (6 bytes) and ``mtu``."""

    device_id = 1
    pci_class = 0x020000            # network controller, Ethernet
    queue_sizes = QUEUE_SIZES

    BASE_FEATURES = p.bits(p.F_MAC, p.F_MTU, p.F_STATUS, p.F_MRG_RXBUF, p.F_CTRL_VQ,
                           p.F_CTRL_MAC_ADDR)

    def __init__(self, backend, *, mac: bytes, mtu: int = 1500,
                 log: logging.Logger | None = None, name: str = "virtio-net"):
        super().__init__()
        if len(mac) != 6:
            raise ValueError("a MAC address has 6 bytes")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu {mtu} is not in 68-65535")
        self.backend = backend
        self.name = name
        self.log = log or logging.getLogger(__name__)
        self.glog = GuestLog(self.log)          # lines the guest can repeat at will
        self.default_mac = bytes(mac)
        self.mac = bytes(mac)
        self.mtu = mtu
        self.features = self.BASE_FEATURES | (backend.offloads & p.OFFLOADS)
        self._stats = dict.fromkeys(STAT_NAMES, 0)   # Python's counts (and stopped engines')
        self.tx_engine = None                   # the queue backend's C transmit path, while active
        self._logged: set[str] = set()
        self._pending: collections.deque = collections.deque()
        self._pending_lock = threading.Lock()
        self._producer_waiting = False
        self._held: list = []                   # receive chains popped but not used yet
        self._plain_limit = p.max_plain_frame(mtu)
        self._mergeable = False
        self._held_contiguous = True            # _held are the chains taken last (snapshots)
        self._rx_valid = 0                      # DATA_VALID on every frame (backend vouches)
        backend.attach(self)

    # -- VirtioDevice ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return p.config_bytes(self.mac, p.S_LINK_UP, self.mtu)

    def activate(self, queues: list, driver_features: int) -> None:
        self._stop_tx_engine()          # idempotent: the engine always serves the current queue
        super().activate(queues, driver_features)
        self._held = []
        self._held_contiguous = True
        self._mergeable = self.negotiated(p.F_MRG_RXBUF)
        self._rx_valid = (p.HDR_F_DATA_VALID if self.backend.rx_checksums_valid
                          and self.negotiated(p.F_GUEST_CSUM) else 0)
        self.backend.configure(driver_features)
        self._start_tx_engine()
        if self.pending():
            self.wake(p.RX)

    def reset(self) -> None:
        self._stop_tx_engine()
        super().reset()
        self._held = []
        self._held_contiguous = True
        self.mac = self.default_mac
        self._mergeable = False
        self._rx_valid = 0
        with self._pending_lock:
            self._pending.clear()
        self.backend.configure(0)
        self._space_freed()

    def process(self, index: int) -> None:
        queue = self.queues[index] if 0 <= index < len(self.queues) else None
        if queue is None:
            return
        if index == p.RX:
            self._receive(queue)
        elif index == p.TX:
            if self.tx_engine is None:
                self._transmit(queue)
        elif index == p.CTRL:
            self._control(queue)

    def start(self) -> None:
        self.backend.start()

    def close(self) -> None:
        self._stop_tx_engine()                   # before the tap it writes to is closed
        self.backend.close()
        dropped = {k: v for k, v in self.stats.items()
                   if v and k not in ("rx_frames", "rx_bytes", "tx_frames", "tx_bytes")}
        if dropped:
            self.log.info("%s: %s", self.name, ", ".join(f"{k} {v}" for k, v in dropped.items()))

    # -- the transmit engine --------------------------------------------------------------
    def _start_tx_engine(self) -> None:
        make = getattr(self.queue_backend, "net_tx_engine", None)
        fd = getattr(self.backend, "tap_fd", None)        # a TapBackend has one
        queue = self.queues[p.TX] if len(self.queues) > p.TX else None
        if (make is None or self.host is None or queue is None or not isinstance(fd, int)
                or fd < 0):
            return
        wiring = self.host.wiring(p.TX)
        mem = queue.memory
        try:
            engine = make(queue, tap_fd=fd, features=self.driver_features,
                          plain_limit=self._plain_limit, gso_limit=p.MAX_GSO_FRAME,
                          kick_fd=wiring.kick_fd, irq_fd=wiring.irq_fd,
                          resample_fd=wiring.resample_fd,
                          on_frame=lambda chain: self._send(mem, chain))
        except OSError as e:
            self.glog.warning("engine", "%s: the %s transmit engine did not start (%s); serving "
                              "the queue in Python", self.name, self.queue_backend.name, e)
            return
        if engine is not None:
            self.tx_engine = engine
            self.host.offload(p.TX, engine)
            self.glog.info("engine-on", "%s: the transmit queue runs on the %s engine's C thread "
                           "(%s)", self.name, self.queue_backend.name,
                           "MSI-X" if wiring.msix else "INTx")

    def _stop_tx_engine(self) -> None:
        engine = self.tx_engine
        if engine is None:
            return
        self.host.release(p.TX)
        engine.stop()                                # its final counters stay readable
        self.tx_engine = None
        for stat, n in _engine_counts(engine).items():
            self._stats[stat] += n

    # -- counters -------------------------------------------------------------------------
    @property
    def stats(self) -> dict[str, int]:
        """The counters (STAT_NAMES), the running transmit engine's included."""
        engine = self.tx_engine
        if engine is None:
            return self._stats
        stats = dict(self._stats)
        for stat, n in _engine_counts(engine).items():
            stats[stat] += n
        return stats

    def count(self, stat: str, detail: str = "") -> None:
        """Count one event; the first of each kind is logged with ``detail``."""
        self._stats[stat] += 1
        if stat in _WHY and stat not in self._logged:
            self._logged.add(stat)
            self.log.warning("%s: %s%s; further ones are only counted (%s)", self.name,
                             _WHY[stat], f" ({detail})" if detail else "", stat)

    # -- frames from the host (any thread) ------------------------------------------------
    def deliver(self, item: bytes) -> bool:
        """Queue one frame for the guest: ``item`` is a 12-byte virtio-net
        header followed by the Ethernet frame.  False (and nothing queued) if
        PENDING_LIMIT frames already wait; the caller decides whether that is
        a drop (``count("rx_dropped")``) or back-pressure (wait for
        ``backend.space_freed``)."""
        with self._pending_lock:
            if len(self._pending) >= PENDING_LIMIT:
                self._producer_waiting = True
                return False
            was_empty = not self._pending
            self._pending.append(item)
        if was_empty:
            self.wake(p.RX)
        return True

    def pending(self) -> int:
        return len(self._pending)

    def has_room(self) -> bool:
        """Whether :meth:`deliver` would take a frame now; if not, the backend
        hears ``space_freed()`` once frames have gone to the guest."""
        with self._pending_lock:
            if len(self._pending) < PENDING_LIMIT:
                return True
            self._producer_waiting = True
            return False

    def _space_freed(self) -> None:
        with self._pending_lock:
            if not self._producer_waiting or len(self._pending) > PENDING_LIMIT // 2:
                return
            self._producer_waiting = False
        self.backend.space_freed()

    # -- receive -------------------------------------------------------------------------
    def _receive(self, queue) -> None:
        mem, pending, lock = queue.memory, self._pending, self._pending_lock
        try:
            while True:
                with lock:
                    if not pending:
                        return
                    item = pending.popleft()
                if not self._receive_one(queue, mem, item):
                    with lock:
                        pending.appendleft(item)         # no receive buffers: wait for a kick
                    return
        finally:
            self._space_freed()

    def _rx_header(self, item) -> tuple[tuple, bytes | bytearray | memoryview] | None:
        """The header fields (all but num_buffers) the guest gets for
        ``item``, and the frame; None if the frame is dropped (counted)."""
        frame = memoryview(item)[p.HDR_SIZE:]
        size = len(frame)
        if len(item) < p.HDR_SIZE or size < p.MIN_FRAME:
            self.count("rx_errors", f"runt frame of {max(size, 0)} bytes")
            return None
        if item[0] == 0 and item[1] == 0:                # no offload: the usual case
            if size > self._plain_limit:
                self.count("rx_oversize", f"{size} bytes, limit {self._plain_limit}")
                return None
            return (self._rx_valid, 0, 0, 0, 0, 0), frame
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, _ = p.HDR.unpack_from(item)
        gso = gso_type & ~p.GSO_ECN
        guest_csum = self.negotiated(p.F_GUEST_CSUM)
        if gso:
            need = p.GUEST_GSO_FEATURE.get(gso)
            if (need is None or not self.negotiated(need) or not flags & p.HDR_F_NEEDS_CSUM
                    or (gso_type & p.GSO_ECN and not self.negotiated(p.F_GUEST_ECN))):
                self.count("rx_errors", f"GSO type {gso_type:#x}")
                return None
        elif gso_type:
            self.count("rx_errors", f"GSO type {gso_type:#x}")
            return None
        # 5.1.6.3.2: no frame without GSO above the MTU (plus the link-level header)
        limit = p.MAX_GSO_FRAME if gso else self._plain_limit
        if size > limit:
            self.count("rx_oversize", f"{size} bytes, limit {limit}")
            return None
        if flags & p.HDR_F_NEEDS_CSUM:
            if csum_start + csum_offset + 2 > size:
                self.count("rx_errors", "checksum field outside the frame")
                return None
            if guest_csum:
                return (p.HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, csum_start,
                        csum_offset), frame
            frame = bytearray(frame)                     # the guest wants it finished
            complete_checksum(frame, csum_start, csum_offset)
            return (0, 0, 0, 0, 0, 0), frame
        valid = (flags & p.HDR_F_DATA_VALID) if guest_csum else 0
        return (valid | self._rx_valid, 0, 0, 0, 0, 0), frame

    def _receive_one(self, queue, mem, item) -> bool:
        """Copy one frame into receive buffers; False if the guest has not
        posted enough of them (the caller keeps the frame)."""
        parsed = self._rx_header(item)
        if parsed is None:
            return True                                  # dropped, counted
        fields, frame = parsed
        need = p.HDR_SIZE + len(frame)
        held = self._held
        if not held:                                     # the usual case: one fresh buffer
            while True:
                chain = queue.pop()
                if chain is None:
                    return False
                if chain.writable_len:
                    break
                queue.push(chain.head, 0)                # nothing to write into: hand it back
            if chain.writable_len >= need and len(chain.writable) == 1:
                view = mem.view(chain.writable[0][0], need)
                view[:p.HDR_SIZE] = p.HDR.pack(*fields, 1)
                view[p.HDR_SIZE:] = frame
                queue.push(chain.head, need)
                self._stats["rx_frames"] += 1
                self._stats["rx_bytes"] += len(frame)
                return True
            held.append(chain)
        if self._mergeable:
            have = sum(c.writable_len for c in held)
            while have < need:
                if len(held) >= queue.size:
                    self.count("rx_oversize", f"{len(frame)} bytes do not fit the whole ring")
                    return True
                chain = queue.pop()
                if chain is None:
                    return False
                if chain.writable_len == 0:
                    queue.push(chain.head, 0)
                    self._held_contiguous = False      # held chains are no longer the last taken
                    continue
                held.append(chain)
                have += chain.writable_len
            used, total = [], 0
            for chain in held:
                used.append(chain)
                total += chain.writable_len
                if total >= need:
                    break
        else:
            if held[0].writable_len < need:
                self.count("rx_oversize", f"{len(frame)} bytes, the driver's buffer holds "
                           f"{max(held[0].writable_len - p.HDR_SIZE, 0)}")
                return True                              # the buffer waits for the next frame
            used = held[:1]
        header = p.HDR.pack(*fields, len(used))
        queue.push_many(self._scatter(mem, used, header, frame))
        del held[:len(used)]
        if not held:
            self._held_contiguous = True
        self._stats["rx_frames"] += 1
        self._stats["rx_bytes"] += len(frame)
        return True

    @staticmethod
    def _scatter(mem, chains, header: bytes, frame) -> list[tuple[int, int]]:
        """Write ``header`` + ``frame`` through ``chains`` in order, each filled
        before the next; the used elements ``(head, bytes written)``."""
        pieces = [memoryview(header), memoryview(frame)]
        piece, offset = 0, 0
        used = []
        for chain in chains:
            written = 0
            for view in chain.writable_views(mem):
                pos = 0
                while pos < len(view) and piece < len(pieces):
                    src = pieces[piece]
                    n = min(len(view) - pos, len(src) - offset)
                    view[pos:pos + n] = src[offset:offset + n]
                    pos += n
                    offset += n
                    if offset == len(src):
                        piece, offset = piece + 1, 0
                written += pos
                if piece == len(pieces):
                    break
            used.append((chain.head, written))
        return used

    # -- transmit --------------------------------------------------------------------------
    def _transmit(self, queue) -> None:
        mem = queue.memory
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                self._send(mem, chain)
                queue.push(chain.head, 0)
            if not queue.enable_notifications():
                return

    def _tx_problem(self, hdr: p.NetHeader, size: int) -> str | None:
        """Why a frame with this header cannot go out (None: it can)."""
        if hdr.needs_csum:
            if not self.negotiated(p.F_CSUM):
                return "partial checksum without VIRTIO_NET_F_CSUM"
            if hdr.csum_start + hdr.csum_offset + 2 > size:
                return f"checksum field {hdr.csum_start}+{hdr.csum_offset} outside the frame"
        if hdr.gso:
            need = p.HOST_GSO_FEATURE.get(hdr.gso)
            if need is None or not self.negotiated(need):
                return f"GSO type {hdr.gso_type:#x} not negotiated"
            if hdr.gso_type & p.GSO_ECN and not self.negotiated(p.F_HOST_ECN):
                return "GSO with ECN without VIRTIO_NET_F_HOST_ECN"
            if not hdr.needs_csum or hdr.gso_size == 0:
                return "GSO frame without a partial checksum or a segment size"
        elif hdr.gso_type:
            return f"unknown GSO type {hdr.gso_type:#x}"
        return None

    def _send(self, mem, chain) -> None:
        size = chain.readable_len - p.HDR_SIZE
        if size < p.MIN_FRAME:
            self.count("tx_errors", f"runt frame of {max(size, 0)} bytes")
            return
        if len(chain.readable) == 1:                     # header and frame in one buffer
            whole = mem.view(chain.readable[0][0], p.HDR_SIZE + size)
            raw, views = whole[:p.HDR_SIZE], [whole[p.HDR_SIZE:]]
        else:
            raw, views = chain.read(mem, 0, p.HDR_SIZE), None
        if raw[0] == 0 and raw[1] == 0:                  # no offload: the usual case
            hdr, limit = _PLAIN, self._plain_limit
        else:
            flags, *fields = p.HDR.unpack(raw)[:6]
            hdr = p.NetHeader(flags & p.HDR_F_NEEDS_CSUM, *fields, 0)   # DATA_VALID: not ours
            problem = self._tx_problem(hdr, size)
            if problem:
                self.count("tx_errors", problem)
                return
            limit = p.MAX_GSO_FRAME if hdr.gso else self._plain_limit
        if size > limit:
            self.count("tx_oversize", f"{size} bytes, limit {limit}")
            return
        if views is None:
            views = chain.readable_views(mem, p.HDR_SIZE, size)
        try:
            self.backend.transmit(hdr, views, size)
        except OSError as e:
            self.count("tx_errors", f"the backend could not send it: {e.strerror or e}")
            return
        self._stats["tx_frames"] += 1
        self._stats["tx_bytes"] += size

    # -- snapshots (kvmkit.device_state) --------------------------------------------------
    # Kept: the guest-set MAC address and the counters; the transport and the
    # queues are the core's.  Receive buffers the device took for a frame it
    # has not finished go back to the ring un-used (they are the last ones
    # taken, so last_avail steps back over them and they are taken again), or,
    # if the driver slipped a buffer without room between them, are returned
    # empty.  Frames from the host not yet in guest buffers are not saved: the
    # network dropped them (the backend's connections are the backend's; see
    # the README's "Snapshots").
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        self._give_back_held()
        return {"version": self.STATE_VERSION, "mac": self.mac.hex(), "stats": dict(self.stats)}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"virtio-net state version {state.get('version')!r}; this plugin "
                             f"reads version {self.STATE_VERSION}")
        mac = bytes.fromhex(state["mac"])
        if len(mac) != 6:
            raise ValueError(f"virtio-net state: MAC {state['mac']!r} is not 6 bytes")
        self.mac = mac
        self._stats.update({k: int(v) for k, v in state["stats"].items() if k in self._stats})

    def _give_back_held(self) -> None:
        held = self._held
        if not held:
            return
        queue = self.queues[p.RX]
        if self._held_contiguous:
            queue.last_avail_idx = (queue.last_avail_idx - len(held)) & 0xFFFF
        else:
            queue.push_many((chain.head, 0) for chain in held)
        self._held = []
        self._held_contiguous = True

    # -- control --------------------------------------------------------------------------
    def _control(self, queue) -> None:
        mem = queue.memory
        while (chain := queue.pop()) is not None:
            ack = self._command(mem, chain)
            if chain.writable_len:
                gpa, _ = chain.writable[0]
                mem.write(gpa, bytes((ack,)))
                queue.push(chain.head, 1)
            else:
                queue.push(chain.head, 0)

    def _command(self, mem, chain) -> int:
        if chain.readable_len < p.CTRL_HDR.size:
            return p.CTRL_ERR
        cls, cmd = p.CTRL_HDR.unpack(chain.read(mem, 0, p.CTRL_HDR.size))
        data_len = chain.readable_len - p.CTRL_HDR.size
        if (cls, cmd) == (p.CTRL_MAC, p.CTRL_MAC_ADDR_SET) and self.negotiated(p.F_CTRL_MAC_ADDR):
            if data_len != 6:
                return p.CTRL_ERR
            mac = chain.read(mem, p.CTRL_HDR.size, 6)
            if mac[0] & 1:
                return p.CTRL_ERR                        # multicast: not an address to own
            self.mac = bytes(mac)
            self.glog.info("mac", "%s: the guest set its MAC address to %s", self.name,
                           format_mac(self.mac))
            return p.CTRL_OK
        return p.CTRL_ERR

    def __repr__(self) -> str:
        return f"VirtioNet({self.backend!r}, mac={format_mac(self.mac)}, mtu={self.mtu})"
