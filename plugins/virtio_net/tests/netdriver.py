"""A guest driver for virtio-net on kvmkit's virtqueue driver model, and a
backend that records what the device does (imported by the tests; a module
of its own because every test folder has a conftest)."""
from __future__ import annotations

from kvmkit.memory import GuestMemory
from kvmkit.virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                                  VIRTIO_F_VERSION_1)
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.queue import SplitQueue
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net.net import QUEUE_SIZES, VirtioNet

MEM_SIZE = 16 << 20
DATA_BASE = 0x100000
MAC = bytes.fromhex("020000c0ffee")


class FakeBackend:
    """Records transmitted frames; the test delivers received ones itself."""

    def __init__(self, offloads: int = 0, rx_checksums_valid: bool = False, fail=None):
        self.offloads = offloads
        self.rx_checksums_valid = rx_checksums_valid
        self.sent: list[tuple[p.NetHeader, bytes]] = []
        self.configured: list[int] = []
        self.space = 0
        self.fail = fail
        self.model = None
        self.started = self.closed = False

    def attach(self, model):
        self.model = model

    def configure(self, features):
        self.configured.append(features)

    def transmit(self, hdr, views, size):
        if self.fail is not None:
            raise self.fail
        data = b"".join(bytes(v) for v in views)
        assert len(data) == size
        self.sent.append((hdr, data))

    def space_freed(self):
        self.space += 1

    def start(self):
        self.started = True

    def close(self):
        self.closed = True


class NetDriver:
    """Plays the guest's virtio-net driver against a :class:`VirtioNet`.

    ``post_rx`` makes receive buffers available, ``run_rx`` lets the device
    fill them and returns the frames the driver would see (header, frame,
    buffers used); ``send`` transmits frames; ``control`` runs a command.
    """

    def __init__(self, dev: VirtioNet, *, features: int | None = None, event_idx: bool = True,
                 indirect: bool = False):
        self.dev = dev
        self.mem = GuestMemory(MEM_SIZE, backing=bytearray(MEM_SIZE))
        rings = GuestAllocator(self.mem, 0x1000, DATA_BASE)
        self.alloc = GuestAllocator(self.mem, DATA_BASE)
        self.drv = [DriverQueue(self.mem, size, rings, indirect_max=8 if indirect else 0,
                                event_idx=event_idx) for size in QUEUE_SIZES]
        self.queues = [SplitQueue(self.mem, size, *d.addresses, event_idx=event_idx,
                                  indirect=indirect) for size, d in zip(QUEUE_SIZES, self.drv)]
        if features is None:
            features = dev.features
        features |= 1 << VIRTIO_F_VERSION_1
        features |= (1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0
        features |= (1 << VIRTIO_F_RING_INDIRECT_DESC) if indirect else 0
        self.features = features
        dev.activate(list(self.queues), features)
        self.rx_buffers: dict[int, tuple[int, int]] = {}     # head -> (gpa, len)

    # -- receive -----------------------------------------------------------------------------
    def post_rx(self, count: int = 1, size: int = 1526, split: int = 1) -> list[int]:
        """``count`` receive chains of ``size`` bytes, each cut into ``split`` buffers."""
        heads = []
        for _ in range(count):
            parts = [size // split] * split
            parts[-1] += size - sum(parts)
            bufs = [(self.alloc.alloc(n, 16), n) for n in parts]
            head = self.drv[p.RX].add([], bufs)
            self.rx_buffers[head] = bufs
            heads.append(head)
        return heads

    def run_rx(self) -> list[tuple[p.NetHeader, bytes, int]]:
        self.dev.process(p.RX)
        return self.collect_rx()

    def collect_rx(self):
        out = []
        used = self.drv[p.RX].used()
        i = 0
        while i < len(used):
            head, written = used[i]
            data = self._read_buffers(self.rx_buffers[head], written)
            hdr = p.NetHeader.unpack(data)
            count = max(hdr.num_buffers, 1) if self.dev.negotiated(p.F_MRG_RXBUF) else 1
            for head2, written2 in used[i + 1:i + count]:
                data += self._read_buffers(self.rx_buffers[head2], written2)
            out.append((hdr, data[p.HDR_SIZE:], count))
            i += count
        return out

    def _read_buffers(self, bufs, written: int) -> bytes:
        out = b""
        for gpa, n in bufs:
            take = min(n, written - len(out))
            if take <= 0:
                break
            out += self.mem.read(gpa, take)
        return out

    # -- transmit ----------------------------------------------------------------------------
    def queue_tx(self, frame: bytes, hdr: p.NetHeader | None = None, split: bool = False,
                 raw: bytes | None = None) -> int:
        data = raw if raw is not None else (hdr or p.NetHeader()).pack() + frame
        if split:                       # header and frame in separate descriptors
            bufs = [(self.alloc.put(data[:p.HDR_SIZE]), p.HDR_SIZE),
                    (self.alloc.put(data[p.HDR_SIZE:]), len(data) - p.HDR_SIZE)]
        else:
            bufs = [(self.alloc.put(data), len(data))]
        return self.drv[p.TX].add(bufs, [])

    def send(self, frame: bytes, hdr: p.NetHeader | None = None, **kw) -> list[tuple[int, int]]:
        self.queue_tx(frame, hdr, **kw)
        self.dev.process(p.TX)
        return self.drv[p.TX].used()

    # -- control -----------------------------------------------------------------------------
    def control(self, cls: int, cmd: int, data: bytes = b"") -> tuple[int, int]:
        """(ack byte, used length) of one control command."""
        out = self.alloc.put(bytes((cls, cmd)) + data)
        ack = self.alloc.alloc(1, 1)
        self.mem.write(ack, b"\xee")
        head = self.drv[p.CTRL].add([(out, 2 + len(data))], [(ack, 1)])
        self.dev.process(p.CTRL)
        used = dict(self.drv[p.CTRL].used())
        return self.mem.read(ack, 1)[0], used[head]


def frame_item(frame: bytes, hdr: p.NetHeader | None = None) -> bytes:
    """What a backend hands the model: header + frame."""
    return (hdr or p.NetHeader()).pack() + frame
