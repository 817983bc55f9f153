"""The virtio-pci modern transport (virtio 1.2, section 4.1) as a register model.

One 64-bit memory BAR holds every structure:

    0x0000  common configuration      0x3000  notifications (4 bytes per queue)
    0x1000  ISR status                0x4000  MSI-X table
    0x2000  device configuration      0x5000  MSI-X pending bits

This class is pure: no KVM, no threads.  The runtime that wires it to KVM
(core/virtio/runtime.py) supplies ``deliver`` (send MSI-X vector i with its
address and data), ``set_intx`` (the INTx level) and ``kick`` (a queue was
notified through an MMIO write: wake the worker), calls ``notify`` on the
device's worker thread, and holds the device lock around every call.

A hostile driver is expected: every register keeps only the bits of its
width (a 4-byte write of 0x10000 to the 16-bit ``queue_select`` selects
queue 0, as a 16-bit register would), unknown offsets read 0 and ignore
writes, and the status follows the spec's rules (3.1.1, 2.1.2): the driver
may set bits, never clear them except by writing 0 (a reset).  A write that
clears bits is a driver error: it is ignored and the device reports
DEVICE_NEEDS_RESET, so the device is activated at most once per reset.
"""
from __future__ import annotations

import logging
import struct
from typing import Callable

from ..guest_log import GuestLog
from ..pci import ConfigSpace, MsixCapability, MsixTable, PCI_CAP_ID_VNDR
from .device import TRANSPORT_FEATURES, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VirtioDevice
from .queue import SplitQueue, VirtqueueError

log = logging.getLogger("kvmkit.virtio")

VIRTIO_PCI_VENDOR = 0x1AF4
VIRTIO_PCI_DEVICE_BASE = 0x1040          # modern device ids: 0x1040 + virtio device type

COMMON, ISR, DEVICE, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x0000, 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
REGION = 0x1000
BAR_SIZE = 0x8000
BAR_INDEX = 0
NOTIFY_MULTIPLIER = 4
COMMON_LENGTH = 0x38

CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI_CFG = 1, 2, 3, 4, 5

STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK = 1, 2, 4
STATUS_FEATURES_OK, STATUS_NEEDS_RESET, STATUS_FAILED = 8, 64, 128

ISR_QUEUE, ISR_CONFIG = 1, 2
NO_VECTOR = 0xFFFF


class QueueState:
    __slots__ = ("max_size", "size", "vector", "enabled", "desc", "driver", "device")

    def __init__(self, max_size: int):
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.vector = NO_VECTOR
        self.enabled = False
        self.desc = self.driver = self.device = 0


def _cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """The body of a virtio_pci_cap after its id/next bytes."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBB2xII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra


class VirtioPciTransport:
    def __init__(self, device: VirtioDevice, memory, *,
                 deliver: Callable[[int, int, int], None] | None = None,
                 set_intx: Callable[[bool], None] | None = None,
                 kick: Callable[[int], None] | None = None,
                 on_vector_change: Callable[[int], None] | None = None,
                 on_msix_control: Callable[[bool, bool], None] | None = None,
                 queue_factory: Callable[..., object] = SplitQueue):
        self.device = device
        self.glog = GuestLog(log)              # what the driver makes us log, rate-limited
        self.queue_factory = queue_factory     # a queue backend's split_queue
        self.isr_sources: list[Callable[[], int]] = []   # read-and-clear ISR bits set elsewhere (C)
        self.memory = memory
        self.deliver = deliver or (lambda vector, address, data: None)
        self._set_intx = set_intx or (lambda level: None)
        self.kick = kick or self.notify
        self.queues = [QueueState(size) for size in device.queue_sizes]
        self.vectors = len(self.queues) + 1
        self.offered = device.features | TRANSPORT_FEATURES
        self.config = ConfigSpace(
            vendor_id=VIRTIO_PCI_VENDOR, device_id=VIRTIO_PCI_DEVICE_BASE + device.device_id,
            class_code=device.pci_class, revision=1, subsystem_vendor_id=VIRTIO_PCI_VENDOR,
            subsystem_id=0x40 + device.device_id, interrupt_pin=1)
        self.config.add_bar(BAR_INDEX, BAR_SIZE, "mem64")
        self.config.add_capability(PCI_CAP_ID_VNDR, _cap(CAP_COMMON, COMMON, COMMON_LENGTH))
        self.config.add_capability(PCI_CAP_ID_VNDR, _cap(CAP_ISR, ISR, 1))
        self.config.add_capability(PCI_CAP_ID_VNDR, _cap(CAP_DEVICE, DEVICE, REGION))
        self.config.add_capability(PCI_CAP_ID_VNDR, _cap(
            CAP_NOTIFY, NOTIFY, NOTIFY_MULTIPLIER * max(len(self.queues), 1),
            struct.pack("<I", NOTIFY_MULTIPLIER)))
        self.msix = MsixTable(self.vectors, on_deliver=self.deliver,
                              on_vector_change=on_vector_change, on_control_change=on_msix_control)
        MsixCapability(self.msix, table_bar=BAR_INDEX, table_offset=MSIX_TABLE,
                       pba_bar=BAR_INDEX, pba_offset=MSIX_PBA).install(self.config)
        device._notify_config = self._config_interrupt
        device._wake = lambda index: self.kick(index)
        self._reset_state()

    # -- state ---------------------------------------------------------------------------
    def _reset_state(self) -> None:
        self.status = 0
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.driver_features = 0
        self.queue_select = 0
        self.config_vector = NO_VECTOR
        self.isr = 0
        self.active: list[SplitQueue | None] = []
        for q in self.queues:
            q.reset()
        self.set_intx(False)

    def reset(self) -> None:
        """Driver-initiated (status 0) or VM-end reset."""
        if self.active:
            self.device.reset()
        self._reset_state()

    @property
    def selected(self) -> QueueState | None:
        return self.queues[self.queue_select] if self.queue_select < len(self.queues) else None

    # -- BAR accesses ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON:
            return self._common_read(off, size)
        if region == ISR:
            value, self.isr = self.isr, 0          # reading ISR clears it and deasserts INTx
            for take in self.isr_sources:
                value |= take()
            self.set_intx(False)
            return value if off == 0 else 0
        if region == DEVICE:
            return self.device.config_read(off, size)
        if region == MSIX_TABLE and off < self.msix.size:
            return self.msix.read(off, size)
        if region == MSIX_PBA and off < self.msix.pba.size:
            return self.msix.pba.read(off, size)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        region, off = offset & ~(REGION - 1), offset & (REGION - 1)
        if region == COMMON:
            self._common_write(off, size, value)
        elif region == DEVICE:
            self.device.config_write(off, size, value)
        elif region == NOTIFY:
            self.kick(off // NOTIFY_MULTIPLIER)
        elif region == MSIX_TABLE and off < self.msix.size:
            self.msix.write(off, size, value)

    # -- common configuration ---------------------------------------------------------------
    def _common_fields(self) -> bytes:
        q = self.selected
        feature = (self.offered >> (32 * self.device_feature_select)) & 0xFFFFFFFF \
            if self.device_feature_select < 2 else 0
        driver = (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF \
            if self.driver_feature_select < 2 else 0
        return struct.pack(
            "<IIIIHHBBHHHHHQQQ", self.device_feature_select, feature, self.driver_feature_select,
            driver, self.config_vector, len(self.queues), self.status,
            self.device._config_generation & 0xFF, self.queue_select,
            q.size if q else 0, q.vector if q else NO_VECTOR, int(q.enabled) if q else 0,
            self.queue_select if q else 0, q.desc if q else 0, q.driver if q else 0,
            q.device if q else 0)

    def _common_read(self, off: int, size: int) -> int:
        data = self._common_fields()
        if off + size > len(data):
            return 0
        return int.from_bytes(data[off:off + size], "little")

    def _common_write(self, off: int, size: int, value: int) -> None:
        q = self.selected
        if off == 0x00:
            self.device_feature_select = value & 0xFFFFFFFF
        elif off == 0x08:
            self.driver_feature_select = value & 0xFFFFFFFF
        elif off == 0x0C:
            if self.status & STATUS_FEATURES_OK or self.driver_feature_select > 1:
                return
            shift = 32 * self.driver_feature_select
            self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | ((value & 0xFFFFFFFF) << shift)
        elif off == 0x10:
            value &= 0xFFFF
            self.config_vector = value if value < self.vectors else NO_VECTOR
        elif off == 0x14:
            self._set_status(value & 0xFF)
        elif off == 0x16:
            self.queue_select = value & 0xFFFF
        if q is None or self.status & STATUS_DRIVER_OK or off < 0x18:
            return                                   # queue fields are frozen once running
        value &= 0xFFFF if off < 0x20 else 0xFFFF_FFFF_FFFF_FFFF
        if off == 0x18:
            if value and value <= q.max_size and value & (value - 1) == 0:
                q.size = value
        elif off == 0x1A:
            q.vector = value if value < self.vectors else NO_VECTOR
        elif off == 0x1C:
            q.enabled = bool(value & 1)
        elif off in (0x20, 0x24, 0x28, 0x2C, 0x30, 0x34):
            field = ("desc", "driver", "device")[(off - 0x20) // 8]
            shift = 32 if off & 4 else 0
            mask = 0xFFFFFFFF << shift
            if size == 8 and not off & 4:
                setattr(q, field, value)
            else:
                setattr(q, field, (getattr(q, field) & ~mask) | ((value & 0xFFFFFFFF) << shift))

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        old = self.status
        value &= ~STATUS_NEEDS_RESET                 # the device's bit, not the driver's
        if old & ~value & ~STATUS_NEEDS_RESET:
            # 2.1.2: the driver MUST NOT clear a status bit (only a reset does).
            # Clearing DRIVER_OK and setting it again would activate the device
            # a second time over live queues: refuse, and ask for a reset.
            self.glog.warning("status", "virtio device %d: the driver cleared status bits "
                              "(%#x -> %#x) without a reset; device needs reset",
                              self.device.device_id, old, value)
            self.needs_reset()
            return
        if value & STATUS_FEATURES_OK and not old & STATUS_FEATURES_OK:
            # Features the device never offered, or a driver without VERSION_1: refuse.
            if self.driver_features & ~self.offered or not self.driver_features >> 32 & 1:
                value &= ~STATUS_FEATURES_OK
        self.status = value | (old & STATUS_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not old & STATUS_DRIVER_OK:
            self._activate()

    def _activate(self, rings: list | None = None) -> None:
        """Build the enabled queues and activate the device; ``rings`` (a
        restore) holds per queue the saved indices (SplitQueue.save_indices)
        that each queue takes before the device sees it."""
        event_idx = bool(self.driver_features >> VIRTIO_F_RING_EVENT_IDX & 1)
        indirect = bool(self.driver_features >> VIRTIO_F_RING_INDIRECT_DESC & 1)
        active: list = []
        for i, q in enumerate(self.queues):
            if not q.enabled:
                active.append(None)
                continue
            try:
                queue = self.queue_factory(self.memory, q.size, q.desc, q.driver, q.device,
                                           event_idx=event_idx, indirect=indirect)
            except VirtqueueError as e:
                self.glog.warning(("unusable", i), "virtio device %d: queue %d unusable: %s",
                                  self.device.device_id, i, e)
                self.needs_reset()
                return
            if rings is not None and i < len(rings) and rings[i] is not None:
                queue.restore_indices(rings[i])
            active.append(queue)
        self.active = active
        self.device.activate(active, self.driver_features)

    # -- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The registers, every queue's setup and the device-side indices of
        the active queues (call with the device quiet: no chain popped and
        not yet returned, engines paused).  The MSI-X table and the config
        space are saved by their owners (``msix``, ``config``)."""
        return {
            "status": self.status,
            "device_feature_select": self.device_feature_select,
            "driver_feature_select": self.driver_feature_select,
            "driver_features": self.driver_features,
            "queue_select": self.queue_select,
            "config_vector": self.config_vector,
            "isr": self.isr,
            "config_generation": self.device._config_generation,
            "queues": [{"size": q.size, "vector": q.vector, "enabled": q.enabled,
                        "desc": q.desc, "driver": q.driver, "device": q.device}
                       for q in self.queues],
            "activated": bool(self.active),
            "rings": [None if q is None else q.save_indices() for q in self.active],
        }

    def restore_state(self, state: dict) -> None:
        """Put the registers back on a fresh transport (same device) and, if
        the device was running, activate it with its queues at the saved
        indices.  Interrupts are not raised here (see :meth:`after_restore`)."""
        queues = state["queues"]
        if len(queues) != len(self.queues):
            raise ValueError(f"virtio state has {len(queues)} queues, the device has {len(self.queues)}")
        if self.active:
            self.reset()
        self.status = int(state["status"]) & 0xFF
        self.device_feature_select = int(state["device_feature_select"]) & 0xFFFFFFFF
        self.driver_feature_select = int(state["driver_feature_select"]) & 0xFFFFFFFF
        self.driver_features = int(state["driver_features"]) & 0xFFFF_FFFF_FFFF_FFFF
        self.queue_select = int(state["queue_select"]) & 0xFFFF
        vector = int(state["config_vector"])
        self.config_vector = vector if vector < self.vectors else NO_VECTOR
        self.isr = int(state["isr"]) & (ISR_QUEUE | ISR_CONFIG)
        self.device._config_generation = int(state["config_generation"])
        for q, saved in zip(self.queues, queues):
            size = int(saved["size"])
            q.size = size if size and size <= q.max_size and size & (size - 1) == 0 else q.max_size
            vector = int(saved["vector"])
            q.vector = vector if vector < self.vectors else NO_VECTOR
            q.enabled = bool(saved["enabled"])
            q.desc, q.driver, q.device = (int(saved[k]) & 0xFFFF_FFFF_FFFF_FFFF
                                          for k in ("desc", "driver", "device"))
        if state["activated"]:
            needs_reset = self.status & STATUS_NEEDS_RESET
            self._activate(state["rings"])
            self.status |= needs_reset
        self.set_intx(bool(self.isr))

    def after_restore(self) -> None:
        """Once everything is back: an interrupt per active queue (a guest
        driver takes a spurious one in its stride; a lost one could leave it
        waiting for ever) and a notification of each, for chains made
        available whose kick was still in flight at the save."""
        if not self.status & STATUS_DRIVER_OK or self.status & STATUS_NEEDS_RESET:
            return
        for i, queue in enumerate(self.active):
            if queue is not None:
                self._interrupt(ISR_QUEUE, self.queues[i].vector)
                self.kick(i)

    def needs_reset(self) -> None:
        """The driver broke the rules: stop using the queues until it resets us."""
        self.status |= STATUS_NEEDS_RESET
        self._config_interrupt()

    # -- notifications and interrupts -------------------------------------------------------
    def notify(self, index: int) -> None:
        """Queue ``index`` was kicked: let the device work, then interrupt if due."""
        if not self.status & STATUS_DRIVER_OK or self.status & STATUS_NEEDS_RESET:
            return
        if index >= len(self.active) or self.active[index] is None:
            return
        try:
            self.device.process(index)
        except VirtqueueError as e:
            self.glog.warning(("broken", index), "virtio device %d: queue %d: %s", self.device.device_id,
                              index, e)
            self.interrupt_if_due(index)         # requests served before the bad chain
            self.needs_reset()
            return
        self.interrupt_if_due(index)

    def interrupt_if_due(self, index: int) -> None:
        queue = self.active[index] if index < len(self.active) else None
        if queue is not None and queue.should_notify():
            self._interrupt(ISR_QUEUE, self.queues[index].vector)

    def _config_interrupt(self) -> None:
        if self.status & STATUS_DRIVER_OK:
            self._interrupt(ISR_CONFIG, self.config_vector)

    def _interrupt(self, isr_bit: int, vector: int) -> None:
        if self.msix.enabled:
            if vector != NO_VECTOR:
                message = self.msix.fire(vector)        # None: masked, left pending
                if message is not None:
                    self.deliver(vector, *message)
            return
        self.isr |= isr_bit
        self.set_intx(True)

    def set_intx(self, level: bool) -> None:
        level = level and not self.config.intx_disabled
        self.config.set_interrupt_status(level)
        self._set_intx(level)
