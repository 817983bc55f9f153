"""The virtio-blk device model (virtio 1.2, section 5.2).

A pure state machine over a :class:`~kvmkit_virtio_blk.backend.BlockBackend`:
the transport hands it queues and calls :meth:`VirtioBlk.process` when the
driver notifies; every request is served synchronously, so a used element is
pushed only after the backend call it reports on has returned (a write's
pwrite, a flush's fdatasync).

Request errors never leave ``process``: a malformed request, one outside the
disk, or a host I/O error completes with VIRTIO_BLK_S_IOERR; an unknown type
with VIRTIO_BLK_S_UNSUPP.  A chain that breaks the ring rules is different:
the queue raises :class:`~kvmkit.plugin_api.VirtqueueError`, which
``process`` lets through for the transport to set DEVICE_NEEDS_RESET.

When the queue backend offers ``blk_engine`` (kvmkit-native) and the backend
is a host file, the whole data path runs on that engine's C thread instead of
``process``: kicks, IN/OUT/FLUSH and interrupts never reach Python, and the
requests the engine leaves to Python come back through ``_serve``.
"""
from __future__ import annotations

import logging

from kvmkit.plugin_api import GuestLog, VirtioDevice

from . import protocol as p
from .backend import BlockBackend

__all__ = ["VirtioBlk", "QUEUE_SIZE", "SIZE_MAX", "SEG_MAX"]

QUEUE_SIZE = 256
# Requests are header + data segments + status in one chain, which may hold
# at most QUEUE_SIZE descriptors.
SEG_MAX = QUEUE_SIZE - 2
# Largest single data segment.  With SEG_MAX segments a conforming request
# carries at most 254 MiB: far below the 2 GiB that one Linux read/write
# system call moves and the 2^32 bytes a chain may describe, so a request is
# never cut short host-side, and one request cannot occupy the device (whose
# lock vCPUs need for its registers) for long.  Linux guests build segments
# from pages and cap requests by max_sectors (1280 KiB by default) anyway.
SIZE_MAX = 1 << 20
# Discard is a hole punch (cheap for any size); 1 GiB keeps one request's
# extent-tree work bounded.  Write-zeroes may fall back to writing zeros where
# fallocate cannot zero, so 32 MiB bounds the time of that worst case.
MAX_DISCARD_SECTORS = (1 << 30) // p.SECTOR
MAX_WRITE_ZEROES_SECTORS = (32 << 20) // p.SECTOR


class VirtioBlk(VirtioDevice):
    """A virtio block device on ``backend``.

    ``serial`` is the GET_ID answer (at most 20 ASCII bytes); with
    ``discard`` (and a writable disk) DISCARD and WRITE_ZEROES are offered.
    """

    device_id = 2
    pci_class = 0x018000            # mass storage, "other"
    queue_sizes = (QUEUE_SIZE,)

    def __init__(self, backend: BlockBackend, *, serial: bytes | str = b"",
                 discard: bool = True, log: logging.Logger | None = None, poll_us: int = 0):
        super().__init__()
        if isinstance(serial, str):
            serial = serial.encode("ascii")
        if len(serial) > p.ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {p.ID_BYTES} bytes")
        self.backend = backend
        self.serial = serial
        self.readonly = bool(backend.readonly)
        self.discard = bool(discard) and not self.readonly
        self.log = log or logging.getLogger(__name__)
        self.glog = GuestLog(self.log)          # lines the guest can repeat at will
        self.capacity = backend.size() // p.SECTOR
        self._writethrough = False
        self.engine = None                  # the queue backend's C data path, while active
        self.poll_us = poll_us              # the engine's adaptive polling bound (0: off)
        features = ((1 << p.F_SIZE_MAX) | (1 << p.F_SEG_MAX) | (1 << p.F_BLK_SIZE)
                    | (1 << p.F_FLUSH))
        if self.readonly:
            features |= 1 << p.F_RO
        if self.discard:
            features |= (1 << p.F_DISCARD) | (1 << p.F_WRITE_ZEROES)
        self.features = features
        self._config = p.BlkConfig(
            capacity=self.capacity,
            size_max=SIZE_MAX,
            seg_max=SEG_MAX,
            blk_size=backend.block_size,
            writeback=1,                # completed writes sit in a cache until FLUSH
            num_queues=1,
            max_discard_sectors=MAX_DISCARD_SECTORS if self.discard else 0,
            max_discard_seg=1 if self.discard else 0,
            discard_sector_alignment=(max(1, backend.discard_granularity // p.SECTOR)
                                      if self.discard else 0),
            max_write_zeroes_sectors=MAX_WRITE_ZEROES_SECTORS if self.discard else 0,
            max_write_zeroes_seg=1 if self.discard else 0,
            write_zeroes_may_unmap=1 if self.discard else 0,
        ).pack()

    # -- VirtioDevice ------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self._config

    def activate(self, queues: list, driver_features: int) -> None:
        self._stop_engine()             # idempotent: a second activation never leaves two engines
        super().activate(queues, driver_features)
        # 5.2.6.2: with FLUSH offered but not negotiated (and no CONFIG_WCE), a
        # write must be stable when it completes.
        self._writethrough = not self.negotiated(p.F_FLUSH)
        self._start_engine()

    def _start_engine(self) -> None:
        make = getattr(self.queue_backend, "blk_engine", None)
        fd = getattr(self.backend, "fileno", None)     # a host file (FileBackend) has one
        queue = self.queues[0] if self.queues else None
        if make is None or not isinstance(fd, int) or fd < 0 or self.host is None or queue is None:
            return
        wiring = self.host.wiring(0)
        mem = queue.memory
        try:
            engine = make(queue, image_fd=fd, capacity=self.capacity,
                          readonly=self.readonly, writethrough=self._writethrough,
                          direct_align=self.backend.block_size if getattr(self.backend, "direct", False) else 0,
                          kick_fd=wiring.kick_fd, irq_fd=wiring.irq_fd,
                          resample_fd=wiring.resample_fd,
                          on_request=lambda chain: self._serve(mem, chain),
                          **({"poll_ns": self.poll_us * 1000} if self.poll_us else {}))
        except OSError as e:
            self.glog.warning("engine", "virtio-blk: the %s queue engine did not start (%s); "
                              "serving the queue in Python", self.queue_backend.name, e)
            return
        if engine is not None:
            self.engine = engine
            self.host.offload(0, engine)
            self.glog.info("engine-on", "virtio-blk: the request queue runs on the %s engine's "
                           "C thread (%s%s)", self.queue_backend.name,
                           "MSI-X" if wiring.msix else "INTx",
                           f", polling {self.poll_us} us after each batch" if self.poll_us else "")

    def _stop_engine(self) -> None:
        if self.engine is not None:
            self.host.release(0)
            stats = self.engine.stats()
            self.engine.stop()
            self.engine = None
            self.glog.info("engine-off", "virtio-blk: the engine served %d requests in C and "
                           "handed %d to Python%s", stats["requests"], stats["deferred"],
                           f"; polling found {stats['polled']} batches in "
                           f"{stats['poll_ns'] / 1e6:.1f} ms of polling" if self.poll_us else "")

    def reset(self) -> None:
        self._stop_engine()
        super().reset()
        self._writethrough = False

    def process(self, index: int) -> None:
        queue = self.queues[index] if 0 <= index < len(self.queues) else None
        if queue is None or self.engine is not None:
            return
        mem = queue.memory
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                queue.push(chain.head, self._serve(mem, chain))
            if not queue.enable_notifications():
                return

    def close(self) -> None:
        self._stop_engine()
        self.backend.close()

    # -- snapshots (kvmkit.device_state) --------------------------------------------------
    # The core saves the transport and the queue: by then every request the guest
    # made available and the device took is completed (the C engine is paused
    # between batches and the requests it handed to Python are served first), so
    # the saved last_avail counts finished requests only.  The image itself is
    # not copied: completed writes are made stable here, and the snapshot names
    # the image (the core records its path and size).
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        try:
            self.backend.flush()
        except OSError as e:
            raise OSError(f"virtio-blk: making the guest's completed writes stable before the "
                          f"snapshot failed: {e.strerror or e}") from e
        return {"version": self.STATE_VERSION, "capacity": self.capacity}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"virtio-blk state version {state.get('version')!r}; this plugin "
                             f"reads version {self.STATE_VERSION}")
        if int(state["capacity"]) != self.capacity:
            # Restored against an image of another size (the core refuses that
            # unless forced): tell the driver, as a resize does.
            self.log.warning("virtio-blk: the image holds %d sectors, the snapshot's %d; the "
                             "guest is told its disk changed size", self.capacity,
                             state["capacity"])
            self.config_changed()

    # -- requests ----------------------------------------------------------------------
    def _serve(self, mem, chain) -> int:
        """Handle one request; returns the bytes written into the chain."""
        wlen = chain.writable_len
        if wlen == 0:
            self.log.debug("request %d has no writable status byte; dropped", chain.head)
            return 0
        if chain.readable_len < p.HEADER.size:
            status, written = p.S_IOERR, 0
        else:
            rtype, _, sector = p.HEADER.unpack(chain.read(mem, 0, p.HEADER.size))
            try:
                status, written = self._dispatch(mem, chain, rtype, sector)
            except OSError as e:
                self.glog.warning("io-error", "virtio-blk: host I/O error (type %d, sector %d): "
                                  "%s", rtype, sector, e)
                status, written = p.S_IOERR, 0
        gpa, n = chain.writable[-1]                  # the status is the last writable byte
        mem.write(gpa + n - 1, bytes((status,)))
        return written + 1

    def _in_range(self, sector: int, nbytes: int) -> bool:
        return sector * p.SECTOR + nbytes <= self.capacity * p.SECTOR

    def _dispatch(self, mem, chain, rtype: int, sector: int) -> tuple[int, int]:
        """(status, data bytes written into the chain) of one request."""
        rlen, wlen = chain.readable_len, chain.writable_len
        data_out = rlen - p.HEADER.size              # driver -> device bytes after the header
        data_in = wlen - 1                           # device -> driver bytes before the status
        if rtype == p.T_IN:
            if data_out or data_in % p.SECTOR or not self._in_range(sector, data_in):
                return p.S_IOERR, 0
            if data_in:
                self.backend.pread(chain.writable_views(mem, 0, data_in), sector * p.SECTOR)
            return p.S_OK, data_in
        if rtype == p.T_OUT:
            if (self.readonly or data_in or data_out % p.SECTOR
                    or not self._in_range(sector, data_out)):
                return p.S_IOERR, 0
            if data_out:
                self.backend.pwrite(chain.readable_views(mem, p.HEADER.size, data_out),
                                    sector * p.SECTOR)
                if self._writethrough:
                    self.backend.flush()
            return p.S_OK, 0
        if rtype == p.T_FLUSH:
            if data_out or data_in:
                return p.S_IOERR, 0
            self.backend.flush()
            return p.S_OK, 0
        if rtype == p.T_GET_ID:
            if data_out or data_in < p.ID_BYTES:
                return p.S_IOERR, 0
            chain.write(mem, 0, self.serial.ljust(p.ID_BYTES, b"\0"))
            return p.S_OK, p.ID_BYTES
        if rtype in (p.T_DISCARD, p.T_WRITE_ZEROES):
            return self._discard_or_zero(mem, chain, rtype, data_out, data_in), 0
        return p.S_UNSUPP, 0

    def _discard_or_zero(self, mem, chain, rtype: int, data_out: int, data_in: int) -> int:
        if self.readonly:
            return p.S_IOERR
        discard = rtype == p.T_DISCARD
        feature = p.F_DISCARD if discard else p.F_WRITE_ZEROES
        if not self.discard or not self.negotiated(feature):
            return p.S_UNSUPP
        if data_in or data_out == 0 or data_out % p.SEGMENT.size:
            return p.S_IOERR
        count = data_out // p.SEGMENT.size
        if count > 1:                                # max_discard_seg = max_write_zeroes_seg = 1
            return p.S_IOERR
        limit = MAX_DISCARD_SECTORS if discard else MAX_WRITE_ZEROES_SECTORS
        raw = chain.read(mem, p.HEADER.size, data_out)
        segments = [p.SEGMENT.unpack_from(raw, i * p.SEGMENT.size) for i in range(count)]
        # 5.2.6.2: unknown flags, or unmap on a discard, are UNSUPP; check all first.
        for _, _, flags in segments:
            if flags & ~p.WRITE_ZEROES_FLAG_UNMAP or (discard and flags):
                return p.S_UNSUPP
        for start, num, _ in segments:
            if num > limit or not self._in_range(start, num * p.SECTOR):
                return p.S_IOERR
        for start, num, flags in segments:
            offset, length = start * p.SECTOR, num * p.SECTOR
            if discard:
                self.backend.discard(offset, length)
            else:
                self.backend.write_zeroes(offset, length, bool(flags & p.WRITE_ZEROES_FLAG_UNMAP))
        if not discard and self._writethrough:
            self.backend.flush()
        return p.S_OK

    def __repr__(self) -> str:
        return (f"VirtioBlk({self.backend!r}, capacity={self.capacity}, "
                f"{'ro' if self.readonly else 'rw'})")
