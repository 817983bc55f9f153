"""The virtio-net transmit engine (src/net.c on src/engine.c): frames reach the
"tap" (a datagram socket pair standing in for it) exactly as the Python
model writes them, frames it does not send are counted by the model as on
the Python path, and the engine's own duties: MSI-X masking, INTx, pausing,
a hostile guest, stopping at reset."""
import logging
import os
import select
import socket
import time

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.plugin_api import VirtqueueError
from kvmkit.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator

pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
net_mod = pytest.importorskip("kvmkit_virtio_net.net", reason="kvmkit-virtio-net is not installed")
from kvmkit.virtio.backends import resolve  # noqa: E402
from kvmkit_native.backend import backend as native  # noqa: E402
from kvmkit_virtio_net import protocol as p  # noqa: E402
from kvmkit_virtio_net import tap as tap_mod  # noqa: E402
from kvmkit_virtio_net.backends import TapBackend, UserBackend  # noqa: E402

MEM = 16 << 20
MAC = bytes.fromhex("020000c0ffee")
TX = p.TX
TUN_ALL = (tap_mod.TUN_F_CSUM | tap_mod.TUN_F_TSO4 | tap_mod.TUN_F_TSO6 | tap_mod.TUN_F_TSO_ECN
           | tap_mod.TUN_F_UFO)


class FakeTap:
    """One end of a SOCK_DGRAM socket pair as the tap: each writev is one datagram."""

    def __init__(self):
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)                   # as open_tap opens the tap
        self.peer.setblocking(False)
        self.fd = self.sock.fileno()
        self.ifname = "fake0"
        self.supported_offloads = TUN_ALL
        self.offloads = 0

    def set_offloads(self, flags):
        self.offloads = flags

    def frames(self, count, timeout=5.0):
        """``count`` datagrams (header + frame), waiting for each."""
        out = []
        deadline = time.monotonic() + timeout
        while len(out) < count and time.monotonic() < deadline:
            if select.select([self.peer], [], [], 0.05)[0]:
                out.append(self.peer.recv(1 << 17))
        return out

    def close(self):
        self.sock.close()
        if self.peer.fileno() >= 0:
            self.peer.close()


class Rig:
    """A VirtioNet on a FakeTap; ``engine``: on the native queue with a host
    (the C transmit path), else on the Python queue without one."""

    def __init__(self, make_host, engine=True, intx=False, event_idx=True, features=None, mtu=1500):
        self.tap = FakeTap()
        self.backend = TapBackend(self.tap, spawn=None, log=logging.getLogger("test"))
        self.dev = net_mod.VirtioNet(self.backend, mac=MAC, mtu=mtu)
        self.host = make_host(intx=intx, index=TX) if engine else None
        queues = native if engine else resolve("python", "test")
        self.dev.queue_backend, self.dev.host = queues, self.host
        self.mem = GuestMemory(MEM, backing=bytearray(MEM))
        rings = GuestAllocator(self.mem, 0x1000, 0x100000)
        self.alloc = GuestAllocator(self.mem, 0x100000)
        self.drv = [DriverQueue(self.mem, n, rings, event_idx=event_idx)
                    for n in net_mod.QUEUE_SIZES]
        self.queues = [queues.split_queue(self.mem, n, *d.addresses, event_idx=event_idx,
                                          indirect=False)
                       for n, d in zip(net_mod.QUEUE_SIZES, self.drv)]
        if features is None:
            features = self.dev.features
        features |= (1 << VIRTIO_F_VERSION_1) | ((1 << VIRTIO_F_RING_EVENT_IDX) if event_idx else 0)
        self.dev.activate(list(self.queues), features)
        assert (self.dev.tx_engine is not None) == engine
        assert self.host is None or self.host.engine is self.dev.tx_engine

    @property
    def engine(self):
        return self.dev.tx_engine

    def queue(self, data: bytes, cuts=()):
        """Make ``data`` (header + frame) available as one chain, cut at ``cuts``."""
        bounds = [0, *cuts, len(data)]
        bufs = [(self.alloc.put(data[a:b]), b - a) for a, b in zip(bounds, bounds[1:])]
        return self.drv[TX].add(bufs, [])

    def run(self, count):
        """Let the device transmit what was queued; the used elements."""
        if self.host is None:
            self.dev.process(TX)
            return self.drv[TX].used()
        os.eventfd_write(self.host.kick_fd, 1)
        return wait_used(self.drv[TX], count, self.engine)

    def close(self):
        self.dev.reset()
        self.dev.close()
        self.tap.close()


def wait_used(drv, count, engine=None, timeout=5.0):
    deadline = time.monotonic() + timeout
    used = []
    while len(used) < count and time.monotonic() < deadline:
        if engine is not None and select.select([engine.event_fd], [], [], 0)[0]:
            engine.service()
        used += drv.used()
        if len(used) < count:
            time.sleep(0.001)
    return used


@pytest.fixture
def rig(make_host):
    made = []

    def make(**kw):
        r = Rig(make_host, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def udp(size: int, fill: int = 0x5A) -> bytes:
    return (b"\xff" * 6 + MAC + b"\x08\x00" + bytes([0x45]) + bytes([fill]) * (size - 15))[:size]


def hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0, num_buffers=0):
    return p.HDR.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


TSO4 = hdr(p.HDR_F_NEEDS_CSUM, p.GSO_TCPV4, 54, 1448, 34, 16)

# (name, header + frame, cuts): every frame goes out on both paths
GOOD = [
    ("plain", hdr() + udp(60), ()),
    ("plain, junk in the fields a plain header does not use", hdr(0, 0, 7, 8, 9, 10, 11) + udp(1514), ()),
    ("plain, header and frame cut everywhere", hdr() + udp(300), (3, 12, 13, 100, 101)),
    ("largest plain", hdr() + udp(p.max_plain_frame(1500)), ()),
    ("DATA_VALID only", hdr(p.HDR_F_DATA_VALID, 0, 5, 6, 7, 8, 9) + udp(200), ()),
    ("partial checksum", hdr(p.HDR_F_NEEDS_CSUM | p.HDR_F_DATA_VALID, 0, 0, 0, 34, 6) + udp(100), (6,)),
    ("TSO4", TSO4 + udp(65014), (12,)),
    ("TSO6 with ECN", hdr(1, p.GSO_TCPV6 | p.GSO_ECN, 74, 1428, 54, 16, 3) + udp(9000), ()),
    ("UFO", hdr(1, p.GSO_UDP, 42, 1472, 34, 6) + udp(4000), (2, 5)),
    ("largest GSO", TSO4 + udp(p.MAX_GSO_FRAME), ()),
]
# (name, header + frame, the counter the model raises)
BAD = [
    ("runt", hdr() + udp(13), "tx_errors"),
    ("no header", b"\0" * 11, "tx_errors"),
    ("plain above the MTU", hdr() + udp(p.max_plain_frame(1500) + 1), "tx_oversize"),
    ("GSO above 64 KiB", TSO4 + udp(p.MAX_GSO_FRAME + 1), "tx_oversize"),
    ("checksum field outside", hdr(1, 0, 0, 0, 90, 9) + udp(100), "tx_errors"),
    ("GSO without a partial checksum", hdr(0, p.GSO_TCPV4, 54, 1448) + udp(3000), "tx_errors"),
    ("GSO without a segment size", hdr(1, p.GSO_TCPV4, 54, 0, 34, 16) + udp(3000), "tx_errors"),
    ("unknown GSO type", hdr(1, 2, 54, 1448, 34, 16) + udp(3000), "tx_errors"),
    ("ECN alone", hdr(0, p.GSO_ECN) + udp(100), "tx_errors"),
]


def run_cases(r, cases):
    sent = []
    for name, data, cuts in cases:
        r.queue(data, cuts)
        assert len(r.run(1)) == 1, name
        sent += r.tap.frames(1, timeout=2)
    return sent


def test_frames_reach_the_tap_exactly_as_the_python_path_writes_them(rig):
    native_rig, python_rig = rig(engine=True), rig(engine=False)
    got = run_cases(native_rig, GOOD)
    want = run_cases(python_rig, GOOD)
    assert len(want) == len(GOOD) and got == want
    for (name, data, _), frame in zip(GOOD, got):
        assert frame[p.HDR_SIZE:] == data[p.HDR_SIZE:], name
    assert got[0][:p.HDR_SIZE] == bytes(12) and got[1][:p.HDR_SIZE] == bytes(12)
    assert got[6][:p.HDR_SIZE] == TSO4                    # TSO: the guest's header, num_buffers 0
    assert got[7][:p.HDR_SIZE] == hdr(1, p.GSO_TCPV6 | p.GSO_ECN, 74, 1428, 54, 16, 0)
    assert got[4][:p.HDR_SIZE] == hdr(0, 0, 5, 6, 7, 8, 9 * 0)    # DATA_VALID dropped
    assert native_rig.dev.stats == python_rig.dev.stats
    assert native_rig.dev.stats["tx_frames"] == len(GOOD)
    assert native_rig.dev.stats["tx_bytes"] == sum(len(d) - p.HDR_SIZE for _, d, _ in GOOD)
    engine = native_rig.engine.stats()
    assert engine["tx_frames"] == len(GOOD) and engine["deferred"] == 0


@pytest.mark.parametrize("name,data,stat", BAD, ids=[c[0] for c in BAD])
def test_dropped_frames_are_counted_by_the_model_as_on_the_python_path(rig, name, data, stat, caplog):
    native_rig, python_rig = rig(engine=True), rig(engine=False)
    with caplog.at_level(logging.WARNING):
        for r in (native_rig, python_rig):
            r.queue(data)
            r.queue(hdr() + udp(60))                      # a good one after it still goes
            assert len(r.run(2)) == 2
            assert len(r.tap.frames(1)) == 1
    assert native_rig.dev.stats == python_rig.dev.stats
    assert native_rig.dev.stats[stat] == 1 and native_rig.dev.stats["tx_frames"] == 1
    assert native_rig.engine.stats()["deferred"] == 1
    messages = [m for m in caplog.messages if "dropped" in m]
    assert len(messages) == 2 and messages[0] == messages[1]


def test_offloads_the_guest_did_not_negotiate_are_left_to_python(rig):
    features = net_mod.VirtioNet.BASE_FEATURES | p.bits(p.F_CSUM, p.F_HOST_TSO4)
    native_rig = rig(engine=True, features=features)
    python_rig = rig(engine=False, features=features)
    cases = [hdr(1, p.GSO_TCPV6, 74, 1428, 54, 16) + udp(3000),      # TSO6 not negotiated
             hdr(1, p.GSO_TCPV4 | p.GSO_ECN, 54, 1448, 34, 16) + udp(3000),   # nor ECN
             hdr(1, p.GSO_UDP, 42, 1472, 34, 6) + udp(3000),         # nor UFO
             TSO4 + udp(3000)]                                       # TSO4 is
    for r in (native_rig, python_rig):
        for data in cases:
            r.queue(data)
        assert len(r.run(len(cases))) == len(cases)
    assert native_rig.tap.frames(1) == python_rig.tap.frames(1)
    assert native_rig.dev.stats == python_rig.dev.stats
    assert native_rig.dev.stats["tx_errors"] == 3 and native_rig.dev.stats["tx_frames"] == 1

    plain_only = rig(engine=True, features=net_mod.VirtioNet.BASE_FEATURES)   # no CSUM
    plain_only.queue(hdr(1, 0, 0, 0, 34, 6) + udp(100))
    assert len(plain_only.run(1)) == 1
    assert plain_only.dev.stats["tx_errors"] == 1 and plain_only.tap.frames(1, timeout=0.2) == []


SMALL_SNDBUF = 8192


def capacity(size):
    """How many datagrams of ``size`` bytes a socket pair with SMALL_SNDBUF holds unread."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
    a.setblocking(False)
    n = 0
    try:
        while n < 1000:
            a.send(bytes(size))
            n += 1
    except BlockingIOError:
        pass
    finally:
        a.close()
        b.close()
    return n


def test_a_refused_write_is_tried_once_more_in_python_then_counted(rig, caplog):
    r = rig(engine=True)
    # A socket pair takes a few datagrams unread (its send buffer, and
    # net.unix.max_dgram_qlen); a full tap answers EAGAIN, which the engine
    # hands to Python as well.
    r.tap.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
    qlen = capacity(len(hdr() + udp(60)))
    if qlen > 200:
        pytest.skip("a datagram socket pair here takes too many datagrams to fill")
    for _ in range(qlen + 2):
        r.queue(hdr() + udp(60))
    with caplog.at_level(logging.WARNING):
        assert len(r.run(qlen + 2)) == qlen + 2
    assert r.dev.stats["tx_frames"] == qlen and r.dev.stats["tx_errors"] == 2
    assert r.engine.stats()["write_errors"] == 2
    assert any("could not send it" in m for m in caplog.messages)
    assert len(r.tap.frames(qlen)) == qlen
    r.tap.peer.close()                                    # now every write fails
    r.queue(hdr() + udp(60))
    assert len(r.run(1)) == 1
    assert r.dev.stats["tx_errors"] == 3


def test_one_interrupt_per_batch_and_event_idx_suppression(rig):
    r = rig(engine=True)
    for _ in range(5):
        r.queue(hdr() + udp(60))
    assert len(r.run(5)) == 5
    assert r.host.interrupts(wait=2) == 1
    assert len(r.tap.frames(5)) == 5
    r.drv[TX].set_used_event(100)                         # the driver wants none for a while
    r.queue(hdr() + udp(60))
    assert len(r.run(1)) == 1
    assert r.host.interrupts(wait=0.2) == 0


def test_masked_vector_keeps_the_interrupt_pending_until_unmasked(rig):
    r = rig(engine=True)
    r.engine.set_masked(True)
    r.queue(hdr() + udp(60))
    assert len(r.run(1)) == 1
    assert r.host.interrupts(wait=0.2) == 0
    r.engine.set_masked(False)
    assert r.host.interrupts(wait=2) == 1
    r.engine.set_masked(False)
    assert r.host.interrupts(wait=0.1) == 0


def test_intx_sets_the_isr_and_reasserts_at_eoi_while_it_is_set(rig):
    r = rig(engine=True, intx=True)
    r.queue(hdr() + udp(60))
    assert len(r.run(1)) == 1
    assert r.host.interrupts(wait=2) == 1
    os.eventfd_write(r.host.resample_fd, 1)
    assert r.host.interrupts(wait=2) == 1
    assert r.engine.take_isr() == 1 and r.engine.take_isr() == 0
    os.eventfd_write(r.host.resample_fd, 1)
    assert r.host.interrupts(wait=0.3) == 0


def test_pause_holds_frames_until_resume(rig):
    r = rig(engine=True)
    r.engine.pause()
    r.queue(hdr() + udp(60))
    os.eventfd_write(r.host.kick_fd, 1)
    time.sleep(0.2)
    assert r.drv[TX].used_idx == 0 and r.tap.frames(1, timeout=0.1) == []
    r.engine.resume()
    assert len(wait_used(r.drv[TX], 1)) == 1 and len(r.tap.frames(1)) == 1


def test_a_chain_outside_guest_ram_breaks_the_queue_after_earlier_frames(rig):
    r = rig(engine=True)
    r.queue(hdr() + udp(60))
    r.drv[TX].write_desc(100, MEM + 4096, 80)
    r.drv[TX].submit_head(100)
    os.eventfd_write(r.host.kick_fd, 1)
    assert select.select([r.engine.event_fd], [], [], 2)[0]
    with pytest.raises(VirtqueueError, match="not inside guest RAM"):
        r.engine.service()
    assert len(r.drv[TX].used()) == 1 and len(r.tap.frames(1)) == 1
    os.eventfd_write(r.host.kick_fd, 1)
    time.sleep(0.1)
    assert r.drv[TX].used_idx == 1


def test_garbage_in_every_ring_slot_never_crashes(rig):
    r = rig(engine=True)
    rnd = __import__("random").Random(11)
    size = net_mod.QUEUE_SIZES[TX]
    for slot in range(size):
        r.drv[TX].write_desc(slot, rnd.getrandbits(64), rnd.getrandbits(32),
                             flags=rnd.getrandbits(16), next=rnd.getrandbits(16))
        r.drv[TX].submit_head(rnd.getrandbits(16) % size)
    os.eventfd_write(r.host.kick_fd, 1)
    select.select([r.engine.event_fd], [], [], 2)
    with pytest.raises(VirtqueueError):
        r.engine.service()


def test_process_does_nothing_while_the_engine_runs_and_reset_stops_it(rig):
    r = rig(engine=True)
    r.engine.pause()
    r.queue(hdr() + udp(60))
    r.dev.process(TX)                                     # the engine's queue: not Python's
    assert r.drv[TX].used_idx == 0
    r.engine.resume()
    assert len(r.run(1)) == 1
    engine = r.engine
    r.dev.reset()
    assert r.dev.tx_engine is None and r.host.released == [TX] and r.host.engine is None
    assert engine._engine is None
    assert r.dev.stats["tx_frames"] == 1                  # the engine's counters stay
    r.dev.reset()                                         # again: nothing to stop


def test_no_engine_without_a_tap_or_a_host(rig):
    r = rig(engine=False)                                 # no host (a unit test, no VM)
    assert r.dev.tx_engine is None
    user = UserBackend.__new__(UserBackend)               # slirp backends have no tap fd
    assert getattr(user, "tap_fd", None) is None
    assert native.net_tx_engine(r.queues[TX], tap_fd=-1, features=0, plain_limit=0, gso_limit=0,
                                kick_fd=-1, irq_fd=-1, resample_fd=-1,
                                on_frame=None) is None    # a Python queue: not this backend's
