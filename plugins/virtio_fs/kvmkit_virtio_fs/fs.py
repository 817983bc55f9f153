"""The virtio-fs device model (virtio 1.2, section 5.11).

Queue 0 is the high-priority queue (FORGET, BATCH_FORGET: requests without a
reply); queues 1.. are request queues.  Each chain is one FUSE request: the
device-readable part holds ``fuse_in_header`` and the arguments (a WRITE's
data follows), the device-writable part receives ``fuse_out_header`` and the
reply.  The FUSE server (:mod:`.fuse_server`) does the work; this module only
moves bytes between it and the chains, and READ and WRITE data go straight
between guest memory and the host file (``preadv`` into, and ``pwritev``
from, views of the chain's guest buffers).

A request whose readable part is larger than :data:`MAX_REQUEST` (a WRITE's
data excepted) is answered with E2BIG without being read, so a guest cannot
make the device copy more than that per request.  A reply that does not fit
the writable part is answered with EIO instead (no partial writes past the
guest's buffers).  A chain that breaks the ring rules raises
:class:`~kvmkit.plugin_api.VirtqueueError` for the transport.
"""
from __future__ import annotations

import errno
import logging
import struct

from kvmkit.plugin_api import VirtioDevice

from . import fuse_proto as p
from .fuse_server import FuseServer

__all__ = ["VirtioFs", "TAG_BYTES", "QUEUE_SIZE", "HIPRIO_QUEUE_SIZE", "MAX_REQUEST"]

DEVICE_ID = 26
TAG_BYTES = 36
QUEUE_SIZE = 1024                   # request queues: room for 1 MiB READ/WRITE chains
HIPRIO_QUEUE_SIZE = 128
MAX_REQUEST = (64 << 10) + 4096     # SETXATTR's 64 KiB value plus names and headers
_CONFIG = struct.Struct(f"<{TAG_BYTES}sI")
_WRITE_HEAD = p.IN_HEADER.size + p.WRITE_IN.size


class VirtioFs(VirtioDevice):
    """A virtio-fs device whose FUSE requests ``server`` answers; ``tag`` is
    the mount tag the guest names (``mount -t virtiofs TAG /mnt``)."""

    device_id = DEVICE_ID
    pci_class = 0x018000            # mass storage, "other"

    def __init__(self, server: FuseServer, tag: str, *, request_queues: int = 1,
                 log: logging.Logger | None = None):
        super().__init__()
        raw = tag.encode("utf-8")
        if not raw or len(raw) > TAG_BYTES or b"\0" in raw:
            raise ValueError(f"tag {tag!r} must be 1-{TAG_BYTES} bytes of UTF-8 without NUL")
        if not 1 <= request_queues <= 64:
            raise ValueError("request_queues must be 1-64")
        self.server = server
        self.tag = tag
        self.request_queues = request_queues
        self.queue_sizes = (HIPRIO_QUEUE_SIZE,) + (QUEUE_SIZE,) * request_queues
        self.log = log or logging.getLogger(__name__)
        self._config = _CONFIG.pack(raw, request_queues)
        self.served = 0

    def config_bytes(self) -> bytes:
        return self._config

    def reset(self) -> None:
        super().reset()
        self.server.reset()             # a new driver starts a new FUSE session (INIT)

    def close(self) -> None:
        self.log.info("virtio-fs %s: served %d requests", self.tag, self.served)
        self.server.close()

    # -- snapshots (kvmkit.device_state) --------------------------------------------------
    # While the guest has the share mounted (a FUSE session is up), the FUSE
    # server's inodes and open files are host file descriptors (O_PATH fds
    # found by device and inode number) that cannot be carried into another
    # process: the snapshot is refused, saying so.  A guest that never mounted
    # it, or unmounted it (DESTROY), has nothing to lose.
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        if self.server.initialized:
            from kvmkit.plugin_api import StateUnsupported
            raise StateUnsupported(
                f"virtio-fs {self.tag}: the guest has the share mounted, and its open files and "
                "inodes are host file descriptors a snapshot cannot carry; unmount it in the "
                "guest (umount) before the snapshot")
        return {"version": self.STATE_VERSION, "served": self.served}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"virtio-fs state version {state.get('version')!r}; this plugin "
                             f"reads version {self.STATE_VERSION}")
        self.served = int(state["served"])

    def process(self, index: int) -> None:
        queue = self.queues[index] if 0 <= index < len(self.queues) else None
        if queue is None:
            return
        mem = queue.memory
        while True:
            queue.disable_notifications()
            while (chain := queue.pop()) is not None:
                queue.push(chain.head, self._serve(mem, chain))
            if not queue.enable_notifications():
                return

    def _serve(self, mem, chain) -> int:
        """Serve one FUSE request; returns the bytes written into the chain."""
        self.served += 1
        rlen, wlen = chain.readable_len, chain.writable_len
        if rlen < p.IN_HEADER.size:
            return self._error(mem, chain, 0, errno.EINVAL)
        head = chain.read(mem, 0, p.IN_HEADER.size)
        _, opcode, unique = struct.unpack_from("<IIQ", head)
        payload = read_into = None
        if opcode == p.WRITE and rlen >= _WRITE_HEAD:
            raw = chain.read(mem, 0, _WRITE_HEAD)
            payload = chain.readable_views(mem, _WRITE_HEAD, rlen - _WRITE_HEAD)
        elif rlen > MAX_REQUEST:
            return self._error(mem, chain, unique, errno.E2BIG)
        else:
            raw = chain.read(mem, 0, rlen)
            if opcode == p.READ and wlen > p.OUT_HEADER.size:
                read_into = chain.writable_views(mem, p.OUT_HEADER.size,
                                                 wlen - p.OUT_HEADER.size)
        reply = self.server.handle(raw, payload, read_into)
        if reply is None:
            return 0
        total = p.OUT_HEADER.size + reply.body_len
        if total > wlen:
            return self._error(mem, chain, unique, errno.EIO)
        chain.write(mem, 0, reply.header())
        if reply.body:
            chain.write(mem, p.OUT_HEADER.size, reply.body)
        return total

    @staticmethod
    def _error(mem, chain, unique: int, err: int) -> int:
        if chain.writable_len < p.OUT_HEADER.size:
            return 0
        chain.write(mem, 0, p.out_header(unique, err, 0))
        return p.OUT_HEADER.size

    def __repr__(self) -> str:
        return f"VirtioFs(tag={self.tag!r}, root={self.server.root!r})"
