"""A hostile driver against the whole virtio-pci transport (seeded random).

The driver reaches the device the way a guest does: PCI configuration
mechanism #1 on the port-I/O bus (0xCF8/0xCFC-0xCFF, every size and port),
and the device's BAR on the MMIO bus wherever the guest programmed it
(common configuration, ISR, device configuration, notifications, the MSI-X
table and PBA, and the holes between them), with every access size and
values chosen to break widths (0x10000, 2**32, all-ones).  It mixes in the
sequences that reach deeper state (feature negotiation, queue set-up with
good and bad ring addresses, DRIVER_OK, clearing status bits, resets, MSI-X
enable and masks), queue notifications as the worker thread runs them, and
random bytes written over the rings.

What must hold: no access raises (in a VM any exception stops it with
status 1), every read fits its size, and the device is never activated
twice without a reset between.  The input count is printed in the run's
summary ("fuzz inputs").
"""
from __future__ import annotations

import logging
import random
import threading
import types

import pytest

from kvmkit.bus import Bus
from kvmkit.memory import GuestMemory
from kvmkit.pci import IoAllocator, MmioAllocator, PciHost
from kvmkit.pci_mapping import add_function
from kvmkit.virtio.device import VirtioDevice
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.queue import VirtqueueError
from kvmkit.virtio.pci_transport import (BAR_INDEX, COMMON, DEVICE, ISR, MSIX_PBA, MSIX_TABLE, NOTIFY,
                                         VirtioPciTransport)

MEM = 1 << 20
SEEDS = range(12)
STEPS = 2500                     # per seed and model
WIDTH_BREAKERS = (0, 1, 2, 3, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x1_0000_0001,
                  0xFFFF_FFFF, 1 << 32, (1 << 63), (1 << 64) - 1)
STATUS_VALUES = (0, 1, 3, 0xB, 0xF, 0x7, 0x4, 0x40, 0x80, 0xFF, 0x4F, 0x8F)


# -- the device models under the transport ---------------------------------------------------
class Echo(VirtioDevice):
    """Core-only model: two queues, returns each chain's readable bytes."""
    device_id = 0x3F
    features = 1 << 0
    queue_sizes = (8, 4)

    def config_bytes(self):
        return bytes(range(16))

    def process(self, index):
        q = self.queues[index] if index < len(self.queues) else None
        if q is None:
            return
        while (chain := q.pop()) is not None:
            data = chain.read(q.memory, 0, min(chain.readable_len, 64))
            n = min(len(data), chain.writable_len)
            if n:
                chain.write(q.memory, 0, data[:n])
            q.push(chain.head, n)


class _NetBackend:
    """Just enough of a virtio-net backend: frames go nowhere."""
    offloads = 0
    rx_checksums_valid = False

    def attach(self, model):
        self.model = model

    def configure(self, features):
        pass

    def transmit(self, hdr, views, size):
        return True

    def space_freed(self):
        pass

    def start(self):
        pass

    def close(self):
        pass


def make_model(kind: str, tmp_path):
    if kind == "echo":
        return Echo()
    if kind == "virtio-rng":
        rng = pytest.importorskip("kvmkit_example_virtio_rng.rng")
        return rng.VirtioRng(max_bytes=64, source=lambda n: b"\x5a" * n)
    if kind.startswith("virtio-blk"):
        blk = pytest.importorskip("kvmkit_virtio_blk.blk")
        from kvmkit_virtio_blk.backend import FileBackend
        image = tmp_path / "disk.img"
        image.write_bytes(bytes(64 << 10))
        model = blk.VirtioBlk(FileBackend(image), serial="fuzz")
        if kind.endswith("native"):                # its data path on the C engine's thread
            pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
            from kvmkit.testing import EngineHost
            from kvmkit.virtio.backends import resolve
            model.queue_backend, model.host = resolve("native", "fuzz"), EngineHost()
        return model
    net = pytest.importorskip("kvmkit_virtio_net.net")
    return net.VirtioNet(_NetBackend(), mac=b"\x52\x54\x00\x12\x34\x56")


def counting(model):
    """Wrap activate/reset to check: never two activations without a reset."""
    state = {"active": False, "activations": 0}
    activate, reset = model.activate, model.reset

    def checked_activate(queues, features):
        assert not state["active"], "activated twice without a reset"
        state["active"] = True
        state["activations"] += 1
        activate(queues, features)

    def checked_reset():
        state["active"] = False
        reset()

    model.activate, model.reset = checked_activate, checked_reset
    return state


# -- the machine around one function ---------------------------------------------------------
class Rig:
    def __init__(self, model, rnd: random.Random):
        self.rnd = rnd
        self.mem = GuestMemory(MEM, backing=bytearray(MEM))
        self.pio, self.mmio = Bus("pio"), Bus("mmio")
        self.pci = PciHost()
        lock = threading.RLock()
        for base, size, handler in self.pci.pio_ranges():
            self.pio.add(base, size, handler, lock, "pci-host")
        machine = types.SimpleNamespace(pio=self.pio, mmio=self.mmio, pci=self.pci,
                                        mmio_alloc=MmioAllocator(), io_alloc=IoAllocator())
        ctx = types.SimpleNamespace(name="fuzzed.0", lock=threading.RLock())
        self.delivered = 0
        factory = {"queue_factory": model.queue_backend.split_queue} if model.host else {}
        self.t = VirtioPciTransport(model, self.mem, deliver=self._deliver, **factory)
        self.slot, self.bars = add_function(machine, ctx, self.t.config, {BAR_INDEX: self.t})
        self.model = model
        self.alloc = GuestAllocator(self.mem, 0x1000)
        self.drivers: list[DriverQueue] = []
        self.inputs = 0

    def _deliver(self, vector, address, data):
        self.delivered += 1

    # -- accesses: every one goes through a bus, as from a vCPU ----------------------------
    def value(self) -> int:
        r = self.rnd.random()
        if r < 0.5:
            return self.rnd.choice(WIDTH_BREAKERS)
        if r < 0.8:
            return self.rnd.getrandbits(self.rnd.choice((8, 16, 32, 64)))
        return self.rnd.randrange(0, MEM)                  # an address inside guest RAM

    def cfg_access(self, register: int, size: int, value: int | None, port: int = 0) -> int:
        self.inputs += 1
        self.pio.write(0xCF8, 4, 0x8000_0000 | self.slot << 11 | register & 0xFC)
        if value is None:
            got = self.pio.read(0xCFC + port, size)
            assert 0 <= got < 1 << (8 * size)
            return got
        self.pio.write(0xCFC + port, size, value)
        return 0

    def bar_base(self) -> int:
        return self.t.config.bar_address(BAR_INDEX)

    def bar_access(self, offset: int, size: int, value: int | None) -> int:
        self.inputs += 1
        addr = self.bar_base() + offset
        if value is None:
            got = self.mmio.read(addr, size)
            assert 0 <= got < 1 << (8 * size)
            return got
        self.mmio.write(addr, size, value & ((1 << (8 * size)) - 1))
        return 0

    def common(self, off: int, size: int, value: int | None = None) -> int:
        return self.bar_access(COMMON + off, size, value)

    # -- what a hostile driver does -------------------------------------------------------
    def random_bar_access(self):
        rnd = self.rnd
        region = rnd.choice((COMMON, COMMON, COMMON, ISR, DEVICE, NOTIFY, MSIX_TABLE, MSIX_PBA, None))
        if region is None:
            offset = rnd.randrange(0, 0x8000 + 16)
        else:
            offset = region + rnd.randrange(0, 0x40 if region != DEVICE else 0x80)
        size = rnd.choice((1, 2, 4, 8))
        self.bar_access(offset, size, None if rnd.random() < 0.4 else self.value())

    def random_cfg_access(self):
        rnd = self.rnd
        register = rnd.choice((0x04, 0x04, 0x10, 0x14, 0x3C, 0x34, rnd.randrange(0x40, 0x100),
                               rnd.randrange(0, 0x100)))
        port = rnd.randrange(4)
        size = rnd.choice((1, 2, 4))
        self.cfg_access(register, size, None if rnd.random() < 0.4 else self.value(), port)

    def msix_control(self):
        msix = next(off for off, cap_id in self.t.config.capabilities() if cap_id == 0x11)
        # message control: the upper half of the capability's first dword
        self.cfg_access(msix, 2, self.rnd.choice((0, 0x8000, 0xC000, 0x4000)), port=2)

    def decode_on(self):
        self.cfg_access(0x04, 2, self.rnd.choice((0x6, 0x2, 0x0, 0x406, 0xFFFF)))

    def status(self):
        self.common(0x14, 1, self.rnd.choice(STATUS_VALUES))

    def bring_up(self):
        """What a driver does to start the device, with random slips."""
        rnd = self.rnd
        self.common(0x14, 1, 0)
        self.common(0x14, 1, 1)
        self.common(0x14, 1, 3)
        for select in (0, 1):
            self.common(0x00, 4, select)
            offered = self.common(0x04, 4)
            self.common(0x08, 4, select)
            self.common(0x0C, 4, offered if rnd.random() < 0.9 else self.value() & 0xFFFFFFFF)
        self.common(0x14, 1, 0xB)
        self.drivers = []
        for index, max_size in enumerate(self.model.queue_sizes):
            if rnd.random() < 0.15:
                continue
            self.common(0x16, 2 if rnd.random() < 0.8 else 4, index | (0x10000 if rnd.random() < 0.2 else 0))
            size = min(max_size, rnd.choice((1, 2, 4, 8)))
            self.common(0x18, 2, size)
            self.common(0x1A, 2, rnd.choice((0, 1, 0xFFFF, index)))
            if rnd.random() < 0.8:
                drv = DriverQueue(self.mem, size, self.alloc, event_idx=False)
                self.alloc.reset()
                desc, avail, used = drv.addresses
                self.drivers.append(drv)
            else:
                desc, avail, used = (self.value() for _ in range(3))
            self.common(0x20, 8, desc)
            self.common(0x28, 4, avail & 0xFFFFFFFF)
            self.common(0x2C, 4, avail >> 32 & 0xFFFFFFFF)
            self.common(0x30, 8, used)
            self.common(0x1C, 2, 1)
        self.common(0x14, 1, 0xF)

    def post_and_kick(self):
        for drv in self.drivers:
            try:
                gpa = self.rnd.randrange(0x80000, MEM - 0x1000)
                drv.add([(gpa, 16)], [(gpa + 0x100, 64)])
            except Exception:                 # the driver model's ring is full
                pass
        self.kick()

    def kick(self):
        index = self.rnd.randrange(len(self.model.queue_sizes) + 1)
        self.inputs += 1
        if self.rnd.random() < 0.5:
            self.bar_access(NOTIFY + 4 * index, 2, index)  # an MMIO notification: the kick callback
        host = self.model.host
        engine = host.engines.get(0) if host is not None else None
        if engine is not None:                             # the engine's thread serves the kick
            host.kick()
            try:
                engine.service()                           # what the worker runs on its event_fd
            except VirtqueueError:
                self.t.needs_reset()
        else:
            self.t.notify(index)                           # what the worker thread then runs

    def scribble(self):
        self.inputs += 1
        gpa = self.rnd.randrange(0, MEM - 256) if self.rnd.random() < 0.5 else 0x1000
        self.mem.write(gpa, self.rnd.randbytes(self.rnd.randrange(1, 256)))

    def step(self):
        r = self.rnd.random()
        if r < 0.35:
            self.random_bar_access()
        elif r < 0.50:
            self.random_cfg_access()
        elif r < 0.58:
            self.status()
        elif r < 0.66:
            self.bring_up()
        elif r < 0.76:
            self.post_and_kick()
        elif r < 0.82:
            self.kick()
        elif r < 0.87:
            self.scribble()
        elif r < 0.92:
            self.msix_control()
        else:
            self.decode_on()
        assert 0 <= self.t.status < 0x100
        assert 0 <= self.t.queue_select < 0x10000


@pytest.mark.parametrize("kind", ["echo", "virtio-rng", "virtio-blk", "virtio-blk-native",
                                  "virtio-net"])
def test_a_hostile_driver_finds_no_exception(kind, tmp_path, fuzz_report, caplog):
    caplog.set_level(logging.CRITICAL)               # the driver is wrong on purpose: quiet
    total = activations = 0
    for seed in SEEDS:
        model = make_model(kind, tmp_path)
        state = counting(model)
        rig = Rig(model, random.Random(f"{kind}-{seed}"))
        rig.decode_on()
        rig.cfg_access(0x04, 2, 0x6)                     # memory decoding and bus mastering on
        try:
            for _ in range(STEPS):
                rig.step()
            rig.cfg_access(0x04, 2, 0x6)
            rig.common(0x14, 1, 0)                       # a reset ends it cleanly
            assert not state["active"]
        finally:
            model.close()
            if model.host is not None:
                model.host.close()
        total += rig.inputs
        activations += state["activations"]
    assert activations > len(SEEDS)                      # the fuzz reached running queues
    fuzz_report(f"virtio-pci transport + PCI config, {kind}: {total} hostile accesses "
                f"({len(SEEDS)} seeds, {activations} activations), no exception")
