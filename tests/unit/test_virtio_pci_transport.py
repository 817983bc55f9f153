"""The virtio-pci modern transport, driven the way Linux's virtio_pci does."""
import struct

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.pci import PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR
from kvmkit.virtio.device import VirtioDevice
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.pci_transport import (COMMON, DEVICE, ISR, MSIX_TABLE, NOTIFY, STATUS_DRIVER_OK,
                                         STATUS_FEATURES_OK, STATUS_NEEDS_RESET, VirtioPciTransport)

ACK, DRIVER = 1, 2
VERSION_1 = 1 << 32
EVENT_IDX = 1 << 29


class Reverser(VirtioDevice):
    """Returns each request's bytes reversed."""
    device_id = 0x3F
    features = 1 << 0
    queue_sizes = (8,)

    def __init__(self):
        super().__init__()
        self.resets = 0
        self.memory = None

    def config_bytes(self):
        return bytes([1, 2, 3, 4])

    def process(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            data = chain.read(self.memory, 0, chain.readable_len)[::-1]
            chain.write(self.memory, 0, data)
            q.push(chain.head, len(data))

    def reset(self):
        super().reset()
        self.resets += 1


class Harness:
    def __init__(self):
        self.mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
        self.dev = Reverser()
        self.dev.memory = self.mem
        self.delivered = []
        self.intx = []
        self.t = VirtioPciTransport(self.dev, self.mem,
                                    deliver=lambda v, a, d: self.delivered.append((v, a, d)),
                                    set_intx=self.intx.append)
        self.alloc = GuestAllocator(self.mem, 0x10000)

    def caps(self):
        """cfg_type -> (offset in BAR, length) from the vendor capabilities."""
        out, msix = {}, None
        cfg = self.t.config
        ptr = cfg.read(0x34, 1)
        while ptr:
            cap_id = cfg.read(ptr, 1)
            if cap_id == PCI_CAP_ID_VNDR:
                out[cfg.read(ptr + 3, 1)] = (cfg.read(ptr + 8, 4), cfg.read(ptr + 12, 4))
            elif cap_id == PCI_CAP_ID_MSIX:
                msix = ptr
            ptr = cfg.read(ptr + 1, 1)
        return out, msix

    def common(self, off, size, value=None):
        if value is None:
            return self.t.read(COMMON + off, size)
        self.t.write(COMMON + off, size, value)

    def negotiate(self, driver_features=VERSION_1):
        self.common(0x14, 1, ACK)
        self.common(0x14, 1, ACK | DRIVER)
        self.common(0x00, 4, 0)
        low = self.common(0x04, 4)
        self.common(0x00, 4, 1)
        high = self.common(0x04, 4)
        offered = low | high << 32
        wanted = driver_features & offered
        self.common(0x08, 4, 0)
        self.common(0x0C, 4, wanted & 0xFFFFFFFF)
        self.common(0x08, 4, 1)
        self.common(0x0C, 4, wanted >> 32)
        self.common(0x14, 1, ACK | DRIVER | STATUS_FEATURES_OK)
        return offered, self.common(0x14, 1)

    def setup_queue(self, event_idx=False, size=8, vector=0xFFFF):
        drv = DriverQueue(self.mem, size, self.alloc, event_idx=event_idx)
        desc, avail, used = drv.addresses
        self.common(0x16, 2, 0)
        assert self.common(0x18, 2) == 8
        self.common(0x18, 2, size)
        self.common(0x1A, 2, vector)
        self.common(0x20, 8, desc)
        self.common(0x28, 4, avail & 0xFFFFFFFF)
        self.common(0x2C, 4, avail >> 32)
        self.common(0x30, 8, used)
        self.common(0x1C, 2, 1)
        return drv

    def go(self):
        self.common(0x14, 1, ACK | DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)


def test_identity_and_capabilities():
    h = Harness()
    cfg = h.t.config
    assert cfg.read(0, 2) == 0x1AF4 and cfg.read(2, 2) == 0x1040 + 0x3F
    assert cfg.read(8, 1) >= 1                                   # modern-only: revision >= 1
    caps, msix = h.caps()
    assert caps == {1: (COMMON, 0x38), 3: (ISR, 1), 4: (DEVICE, 0x1000), 2: (NOTIFY, 4)}
    assert msix is not None and cfg.read(msix + 2, 2) & 0x7FF == 1      # 2 vectors


def test_feature_negotiation_and_device_config():
    h = Harness()
    offered, status = h.negotiate(VERSION_1 | EVENT_IDX | 1 | 1 << 40)
    assert offered & VERSION_1 and offered & EVENT_IDX and offered & 1
    assert status & STATUS_FEATURES_OK
    assert h.t.driver_features == VERSION_1 | EVENT_IDX | 1             # never more than offered
    assert h.t.read(DEVICE + 1, 2) == 0x0302
    assert h.common(0x12, 2) == 1                                       # num_queues


def test_driver_without_version_1_is_refused():
    h = Harness()
    _, status = h.negotiate(driver_features=1)
    assert not status & STATUS_FEATURES_OK


def test_request_round_trip_with_intx():
    h = Harness()
    h.negotiate()
    drv = h.setup_queue()
    h.go()
    out, back = h.alloc.put(b"kvmkit"), h.alloc.alloc(6)
    head = drv.add([(out, 6)], [(back, 6)])
    assert drv.kick()
    h.t.write(NOTIFY, 2, 0)
    assert drv.used() == [(head, 6)]
    assert h.mem.read(back, 6) == b"tikmvk"
    assert h.intx[-1] is True
    assert h.t.read(ISR, 1) == 1                # queue interrupt; reading clears it
    assert h.intx[-1] is False and h.t.read(ISR, 1) == 0


def test_msix_delivery_masking_and_pending():
    h = Harness()
    _, msix = h.caps()
    h.t.config.write(msix + 2, 2, 1 << 15)     # MSI-X enable
    h.t.write(MSIX_TABLE + 0, 4, 0xFEE00000)
    h.t.write(MSIX_TABLE + 8, 4, 0x41)
    h.negotiate()
    drv = h.setup_queue(vector=0)
    assert h.common(0x1A, 2) == 0
    h.go()
    out, back = h.alloc.put(b"ab"), h.alloc.alloc(2)
    drv.add([(out, 2)], [(back, 2)])
    h.t.write(NOTIFY, 2, 0)
    assert h.delivered == []                    # vector still masked: pending
    h.t.write(MSIX_TABLE + 12, 4, 0)            # unmask -> the pending message goes out
    assert h.delivered == [(0, 0xFEE00000, 0x41)]
    drv.add([(out, 2)], [(back, 2)])
    h.t.write(NOTIFY, 2, 0)
    assert len(h.delivered) == 2 and not h.intx[1:]


def test_queue_outside_guest_ram_sets_needs_reset():
    h = Harness()
    h.negotiate()
    h.setup_queue()
    h.common(0x20, 8, 1 << 40)                  # descriptor table far outside RAM
    h.go()
    assert h.common(0x14, 1) & STATUS_NEEDS_RESET
    h.t.write(NOTIFY, 2, 0)                     # ignored, no exception


def test_hostile_chain_sets_needs_reset_and_reset_recovers():
    h = Harness()
    h.negotiate()
    drv = h.setup_queue()
    h.go()
    drv.write_desc(0, 0, 16, flags=1, next=0)   # a descriptor that loops to itself
    drv.write_avail_entry(0, 0)
    drv.set_avail_idx(1)
    h.t.write(NOTIFY, 2, 0)
    assert h.common(0x14, 1) & STATUS_NEEDS_RESET
    h.common(0x14, 1, 0)                        # driver resets the device
    assert h.common(0x14, 1) == 0 and h.dev.resets == 1
    assert h.common(0x1C, 2) == 0               # queue disabled again


def test_queue_fields_frozen_after_driver_ok():
    h = Harness()
    h.negotiate()
    drv = h.setup_queue()
    h.go()
    h.common(0x20, 8, 0x1234000)
    assert h.common(0x20, 8) == drv.addresses[0]


@pytest.mark.parametrize("value", [0, 3, 16])
def test_bad_queue_sizes_are_ignored(value):
    h = Harness()
    h.common(0x16, 2, 0)
    h.common(0x18, 2, value)
    assert h.common(0x18, 2) == 8


def test_device_wake_runs_the_queue_like_a_kick():
    h = Harness()
    h.negotiate()
    drv = h.setup_queue()
    h.go()
    out, back = h.alloc.put(b"xy"), h.alloc.alloc(2)
    head = drv.add([(out, 2)], [(back, 2)])
    h.dev.wake(0)                               # host-side work, no guest kick
    assert drv.used() == [(head, 2)] and h.mem.read(back, 2) == b"yx"


@pytest.mark.parametrize("off,size,value,reads_back", [
    (0x16, 4, 0x10000, 0),                      # queue_select is 16 bits: 0x10000 selects queue 0
    (0x16, 8, (1 << 64) - 1, 0xFFFF),
    (0x00, 8, 1 << 32, 0),                      # device_feature_select is 32 bits
    (0x08, 8, (1 << 32) | 1, 1),                # driver_feature_select too
    (0x10, 8, (1 << 32) | 1, 1),                # config_msix_vector: 16 bits, then checked
])
def test_registers_keep_only_their_width(off, size, value, reads_back):
    """Before: a 4-byte write of 0x10000 to queue_select made every later
    common-config read raise struct.error (the VM stopped with status 1)."""
    h = Harness()
    h.common(off, size, value)
    width = {0x16: 2, 0x10: 2}.get(off, 4)
    assert h.common(off, width) == reads_back
    for o in range(0, 0x38, 2):                 # every field still reads
        h.common(o, 2)
