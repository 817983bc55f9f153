"""Where the device's frames go: user-mode networking or a tap.

A backend tells the model which offloads it can honour (``offloads``,
virtio-net feature bits), whether the frames it delivers carry correct
checksums (``rx_checksums_valid``), and implements:

``attach(model)``     remember the :class:`~kvmkit_virtio_net.net.VirtioNet`
``configure(features)``  the driver's features (0 after a reset)
``transmit(hdr, views, size)``  send one frame (device lock held, worker thread)
``space_freed()``     the model has room for frames again (any thread)
``start()`` / ``close()``  the backend's own thread

Each runs one thread (``ctx.spawn``) that ends when ``close()`` is called
or the VM stops.
"""
from __future__ import annotations

import logging
import os
import select

from . import protocol as p
from .checksum import complete_checksum
from .forward import Forward
from .slirp import Slirp
from .tap import (TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO, Tap,
                  tun_offload_flags)

__all__ = ["UserBackend", "TapBackend"]

_HDR_NONE = bytes(p.HDR_SIZE)


class _Threaded:
    """A backend thread started with ``spawn`` and stopped through an eventfd."""

    def __init__(self, spawn, log: logging.Logger):
        self._spawn = spawn
        self.log = log
        self._stop_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._thread = None
        self.model = None

    def attach(self, model) -> None:
        self.model = model

    def _start(self, name: str, target) -> None:
        if self._thread is None and self._stop_fd is not None:
            self._thread = self._spawn(name, target)

    def _stop_thread(self) -> None:
        if self._stop_fd is None:
            return
        os.eventfd_write(self._stop_fd, 1)
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                self.log.warning("%r: its thread did not stop", self)
        os.close(self._stop_fd)
        self._stop_fd = None


class UserBackend(_Threaded):
    """User-mode networking through libslirp: DHCP, DNS, NAT to host
    sockets, and host-to-guest ``forwards``.

    The guest may leave checksums to the device (VIRTIO_NET_F_CSUM): they
    are finished here, because slirp takes complete frames.  No GSO either
    way (slirp would need segmented frames)."""

    offloads = p.bits(p.F_CSUM, p.F_GUEST_CSUM)
    rx_checksums_valid = True           # slirp computes every checksum it sends

    def __init__(self, *, spawn, log: logging.Logger, mtu: int = 1500,
                 forwards: list[Forward] = (), hostname: str | None = None,
                 outbound: bool = True, host_loopback: bool = True):
        super().__init__(spawn, log)
        self.slirp = Slirp(self._from_slirp, mtu=mtu, hostname=hostname, log=log,
                           outbound=outbound, host_loopback=host_loopback)
        try:
            for fwd in forwards:
                self.slirp.add_forward(fwd)
        except BaseException:
            self.slirp.close()
            os.close(self._stop_fd)
            raise
        self.forwards = list(forwards)

    def configure(self, driver_features: int) -> None:
        pass

    def start(self) -> None:
        self._start("slirp", lambda: self.slirp.run(self._stop_fd))

    def transmit(self, hdr: p.NetHeader, views, size: int) -> None:
        frame = b"".join(views)
        if hdr.needs_csum:
            frame = bytearray(frame)
            complete_checksum(frame, hdr.csum_start, hdr.csum_offset)
        self.slirp.input(frame)

    def _from_slirp(self, frame: bytes) -> None:
        model = self.model
        if model is not None and not model.deliver(_HDR_NONE + frame):
            model.count("rx_dropped", "slirp's frame found the pending queue full")

    def space_freed(self) -> None:
        pass                            # slirp's frames are dropped when full; TCP retransmits

    def close(self) -> None:
        self._stop_thread()
        self.slirp.close()

    def __repr__(self) -> str:
        return f"UserBackend(slirp {self.slirp.version}, {len(self.forwards)} forwards)"


class TapBackend(_Threaded):
    """A tap device: frames with their virtio-net header pass straight
    through; the guest's receive offloads are switched on the tap
    (TUNSETOFFLOAD) once it has negotiated them."""

    rx_checksums_valid = False          # the tap's header says, frame by frame
    READ_BATCH = 64                     # frames read per wake-up before looking at the rest

    def __init__(self, tap: Tap, *, spawn, log: logging.Logger):
        super().__init__(spawn, log)
        self.tap = tap
        self._space_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        supported = tap.supported_offloads
        offloads = 0
        # Host side: a tap takes GSO frames behind the header whatever TUNSETOFFLOAD says.
        offloads |= p.HOST_OFFLOADS
        # Guest side: what the tap can be told to hand us.
        if supported & TUN_F_CSUM:
            offloads |= p.bits(p.F_GUEST_CSUM)
            for tun_bit, feature in ((TUN_F_TSO4, p.F_GUEST_TSO4), (TUN_F_TSO6, p.F_GUEST_TSO6),
                                     (TUN_F_UFO, p.F_GUEST_UFO)):
                if supported & tun_bit:
                    offloads |= 1 << feature
            if supported & TUN_F_TSO_ECN and supported & (TUN_F_TSO4 | TUN_F_TSO6):
                offloads |= 1 << p.F_GUEST_ECN
        self.offloads = offloads
        self._buf = bytearray(p.HDR_SIZE + p.MAX_GSO_FRAME + 1)

    def configure(self, driver_features: int) -> None:
        def has(bit: int) -> bool:
            return bool(driver_features >> bit & 1)
        flags = tun_offload_flags(has(p.F_GUEST_CSUM), has(p.F_GUEST_TSO4), has(p.F_GUEST_TSO6),
                                  has(p.F_GUEST_ECN), has(p.F_GUEST_UFO))
        if self.tap.fd >= 0 and flags != self.tap.offloads:
            try:
                self.tap.set_offloads(flags)
            except OSError as e:
                self.log.warning("%s: TUNSETOFFLOAD %#x failed: %s", self.tap.ifname, flags,
                                 e.strerror)

    def start(self) -> None:
        self._start("tap", self._read_loop)

    @property
    def tap_fd(self) -> int:
        """The tap's fd (IFF_VNET_HDR, 12-byte header): a queue engine that
        transmits by itself (kvmkit-native's) writes frames to it exactly as
        :meth:`transmit` does."""
        return self.tap.fd

    def transmit(self, hdr: p.NetHeader, views, size: int) -> None:
        os.writev(self.tap.fd, [hdr.pack(), *views])

    def space_freed(self) -> None:
        fd = self._space_fd
        if fd is not None:
            os.eventfd_write(fd, 1)

    def _read_loop(self) -> None:
        reading = select.poll()
        reading.register(self.tap.fd, select.POLLIN)
        reading.register(self._stop_fd, select.POLLIN)
        reading.register(self._space_fd, select.POLLIN)
        waiting = select.poll()                  # the pending queue is full: not the tap
        waiting.register(self._stop_fd, select.POLLIN)
        waiting.register(self._space_fd, select.POLLIN)
        while True:
            model = self.model
            poller = reading if model is None or model.has_room() else waiting
            ready = dict(poller.poll(1000))
            if ready.get(self._stop_fd):
                return
            if ready.get(self._space_fd):
                try:
                    os.eventfd_read(self._space_fd)
                except BlockingIOError:
                    pass
            if ready.get(self.tap.fd) and model is not None:
                self._read_some(model)

    def _read_some(self, model) -> None:
        buf, fd = self._buf, self.tap.fd
        view = memoryview(buf)
        for _ in range(self.READ_BATCH):
            if not model.has_room():
                return
            try:
                n = os.readv(fd, [buf])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:             # e.g. EIO while the host side is down
                self.log.debug("%s: read: %s", self.tap.ifname, e.strerror)
                return
            if n < p.HDR_SIZE:
                continue
            if n > p.HDR_SIZE + p.MAX_GSO_FRAME:
                model.count("rx_oversize", f"more than {p.MAX_GSO_FRAME} bytes from the tap")
                continue
            model.deliver(bytes(view[:n]))

    def close(self) -> None:
        self._stop_thread()
        self.tap.close()
        if self._space_fd is not None:
            os.close(self._space_fd)
            self._space_fd = None

    def __repr__(self) -> str:
        return f"TapBackend({self.tap.ifname!r})"
