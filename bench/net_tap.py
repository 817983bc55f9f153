#!/usr/bin/env python3
"""virtio-net through the pure-Python virtqueue and a tap, no guest.

The harness plays the guest driver with kvmkit's virtqueue driver model
(GuestMemory as in a VM, receive/transmit rings, EVENT_IDX, the features the
device offers, as Linux negotiates them) against a VirtioNet on a
TapBackend.  The tap lives in a network namespace the benchmark creates
(root needed) and deletes; nothing leaves it.

transmit  chains of one descriptor (header + frame) are made available,
          ``process(1)`` and ``should_notify()`` run as the transport's
          notify path would; only that device-side time is counted (as in
          blk_queue.py).  The frames are addressed to a MAC no one in the
          namespace has: its kernel takes each from the tap (the tap's
          rx_packets must count every one) and drops it before IP, so a TSO
          frame is accepted with its GSO header but never segmented.
receive   a sender process inside the namespace writes frames to the tap's
          host side through a packet socket as fast as it can; the device's
          tap thread reads them, the harness posts 256 mergeable receive
          buffers of 1526 bytes (Linux's size for MTU 1500) and runs
          ``process(0)`` whenever frames wait, recycling buffers.  Frames per
          second are the guest-visible rate over the wall clock (the tap
          thread and the harness share the GIL, as the tap thread and the
          queue thread do in kvmkit); the device time per frame is
          ``process(0)`` only.  What the device could not keep up with, the
          tap drops (its tx_dropped).

Queue backends: every case runs on the pure-Python queue and, when
kvmkit-native is installed, on the native queue, each with a fresh device on
the same tap.  On the native queue the harness gives the device a host (the
runtime's eventfds: kvmkit.testing.EngineHost), so transmit runs on
kvmkit-native's C engine thread (pop, header checks, writev to the tap, used
ring, interrupt), timed two ways: the engine's busy time (its ``busy_ns``
counter, the same span the Python rows time) and, as "native wall", the wall
time from the write to the kick eventfd until the engine's interrupt says
every chain of the batch is used (adds waking two threads per batch).
Receive stays in the Python model on both (the native queue parses and
returns its chains in C).

    sudo .venv/bin/python bench/net_tap.py [--seconds 5] [--depth 64]
"""
from __future__ import annotations

import argparse
import logging
import struct
import subprocess
import sys
import threading
import time

from kvmkit.memory import GuestMemory
from kvmkit.testing import EngineHost
from kvmkit.virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1
from kvmkit.virtio.driver_model import DriverQueue, GuestAllocator
from kvmkit.virtio.backends import BackendError, resolve
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net.backends import TapBackend
from kvmkit_virtio_net.net import QUEUE_SIZES, VirtioNet
from kvmkit_virtio_net.netns import NetNamespace, available
from kvmkit_virtio_net.tap import open_tap
from machine_info import describe  # bench/ is on sys.path when run as a script

GUEST_RAM = 64 << 20
IFNAME = "kvbench0"
HOST_IP = "192.168.232.1"
GUEST_MAC = bytes.fromhex("020000be4c00")
ELSEWHERE_MAC = bytes.fromhex("020000be4c99")      # no one in the namespace
RX_BUFFER = 1526                                   # hdr + 1514, Linux's mergeable minimum

SENDER = r"""
import socket, struct, sys, time

ifname, size, seconds, dst = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), bytes.fromhex(sys.argv[4])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((ifname, 0))
src = s.getsockname()[4]
frame = dst + src + struct.pack("!H", 0x88B5) + bytes(size - 14)
sent, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(256):
        try:
            s.send(frame)
            sent += 1
        except BlockingIOError:
            pass
print(sent)
"""


def ipv4_udp(size: int) -> bytes:
    """A UDP/IPv4 frame of ``size`` bytes to a MAC no one in the namespace has."""
    ip_len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0, 64, 17, 0,
                     bytes((192, 168, 232, 2)), bytes((192, 168, 232, 99)))
    udp = struct.pack("!HHHH", 9, 9, ip_len - 20, 0)
    return ELSEWHERE_MAC + GUEST_MAC + b"\x08\x00" + ip + udp + bytes(ip_len - 28)


def ipv4_tso(size: int) -> tuple[bytes, p.NetHeader]:
    """A TCP/IPv4 frame of ``size`` bytes to be segmented (TSO) by the host."""
    ip_len = size - 14
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, ip_len, 1, 0x4000, 64, 6, 0,
                     bytes((192, 168, 232, 2)), bytes((192, 168, 232, 99)))
    tcp = struct.pack("!HHIIBBHHH", 40000, 9, 1, 1, 5 << 4, 0x18, 65535, 0, 0)
    frame = ELSEWHERE_MAC + GUEST_MAC + b"\x08\x00" + ip + tcp + bytes(ip_len - 40)
    hdr = p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, gso_type=p.GSO_TCPV4, hdr_len=54, gso_size=1448,
                      csum_start=34, csum_offset=16)
    return frame, hdr


class Rig:
    """The guest side of one VirtioNet on a tap in ``ns``."""

    def __init__(self, ns: NetNamespace, queues: str):
        self.ns = ns
        self.threads: list[threading.Thread] = []
        tap = ns.call(open_tap, IFNAME)
        ns.wait_up(IFNAME)
        self.backend = TapBackend(tap, spawn=self._spawn, log=logging.getLogger("bench"))
        self.dev = VirtioNet(self.backend, mac=GUEST_MAC)
        self.mem = GuestMemory(GUEST_RAM)
        rings = GuestAllocator(self.mem, 0x1000, 0x100000)
        self.alloc = GuestAllocator(self.mem, 0x100000)
        self.drv = [DriverQueue(self.mem, n, rings, event_idx=True) for n in QUEUE_SIZES]
        backend = resolve(queues, f"queue {queues}")
        self.host = EngineHost(index=p.TX) if queues == "native" else None
        self.dev.queue_backend, self.dev.host = backend, self.host
        self.queues = [backend.split_queue(self.mem, n, *d.addresses, event_idx=True, indirect=False)
                       for n, d in zip(QUEUE_SIZES, self.drv)]
        self.rx_buffers: dict[int, int] = {}     # receive chain head -> its buffer
        self.rx_ready = threading.Event()
        self.dev._wake = lambda index: self.rx_ready.set() if index == p.RX else None
        self.dev.activate(list(self.queues), self.dev.features | (1 << VIRTIO_F_VERSION_1)
                          | (1 << VIRTIO_F_RING_EVENT_IDX))
        self.dev.start()
        if self.host is not None and self.dev.tx_engine is None:
            raise RuntimeError("the native transmit engine did not start")

    def _spawn(self, name, target):
        t = threading.Thread(target=target, name=name, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def close(self) -> None:
        self.dev.close()
        if self.host is not None:
            self.host.close()

    # -- transmit ---------------------------------------------------------------------------
    def transmit(self, frame: bytes, hdr: p.NetHeader, depth: int, seconds: float):
        """(frames, device seconds, wall seconds from kick to all used (native) or None)."""
        gpa = self.alloc.put(hdr.pack() + frame, 4096)
        length = p.HDR_SIZE + len(frame)
        drv, queue = self.drv[p.TX], self.queues[p.TX]
        engine = self.dev.tx_engine
        before = self.ns.counters(IFNAME)["rx_packets"]
        busy_ns0 = engine.stats()["busy_ns"] if engine is not None else 0
        frames, busy, wall = 0, 0.0, 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for _ in range(depth):
                drv.add([(gpa, length)], [], publish=False)
            drv.kick()
            if engine is not None:
                wall += self.host.run_batch(drv)
            else:
                t0 = time.perf_counter()
                self.dev.process(p.TX)
                queue.should_notify()
                busy += time.perf_counter() - t0
            if len(drv.used()) != depth:
                raise RuntimeError("the device did not return every transmit chain")
            frames += depth
        arrived = self.ns.counters(IFNAME)["rx_packets"] - before
        if self.dev.stats["tx_errors"] or arrived != frames:
            raise RuntimeError(f"{frames} frames sent, {arrived} reached the tap, "
                               f"stats {self.dev.stats}")
        if engine is not None:
            busy = (engine.stats()["busy_ns"] - busy_ns0) / 1e9
            return frames, busy, wall
        return frames, busy, None

    # -- receive ----------------------------------------------------------------------------
    def receive(self, size: int, seconds: float):
        drv, queue = self.drv[p.RX], self.queues[p.RX]
        buffers = self.rx_buffers
        if not buffers:                             # the driver fills the ring once
            for _ in range(QUEUE_SIZES[p.RX]):
                gpa = self.alloc.alloc(RX_BUFFER, 64)
                buffers[drv.add([], [(gpa, RX_BUFFER)])] = gpa
        drops0 = self.ns.counters(IFNAME)["tx_dropped"]
        start_frames = self.dev.stats["rx_frames"]
        sender = subprocess.Popen(self.ns.exec_prefix() + [sys.executable, "-c", SENDER, IFNAME,
                                                           str(size), str(seconds),
                                                           GUEST_MAC.hex()],
                                  stdout=subprocess.PIPE, text=True)
        busy = 0.0
        t_start = time.perf_counter()
        while sender.poll() is None or self.dev.pending():
            if not self.rx_ready.wait(0.2):
                continue
            self.rx_ready.clear()
            t0 = time.perf_counter()
            self.dev.process(p.RX)
            queue.should_notify()
            busy += time.perf_counter() - t0
            for head, written in drv.used():
                gpa = buffers.pop(head)
                buffers[drv.add([], [(gpa, RX_BUFFER)], publish=False)] = gpa
            drv.kick()
            if self.dev.pending():
                self.rx_ready.set()
        wall = time.perf_counter() - t_start
        sent = int(sender.stdout.read().strip() or 0)
        frames = self.dev.stats["rx_frames"] - start_frames
        dropped = self.ns.counters(IFNAME)["tx_dropped"] - drops0
        return frames, wall, busy, sent, dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per case (default 5)")
    ap.add_argument("--depth", type=int, default=64,
                    help="transmit chains per notification (default 64)")
    args = ap.parse_args()
    why = available()
    if why:
        sys.exit(f"net_tap: needs a network namespace: {why}")
    logging.basicConfig(level=logging.ERROR)
    print(describe())
    backends = ["python"]
    try:
        resolve("native", "bench")
        backends.append("native")
    except BackendError as e:
        print(f"(native queue not measured: {e})")
    print(f"queue backends: {', '.join(backends)}; {args.seconds:g} s per case\n")
    tx_cases = [(ipv4_udp(60), p.NetHeader(), "60-byte"),
                (ipv4_udp(1514), p.NetHeader(), "1514-byte"),
                (*ipv4_tso(65014), "65014-byte TSO (gso_size 1448)")]
    tx_rows, rx_rows = [], []
    with NetNamespace("kvmkit-b") as ns:
        ns.ip("tuntap", "add", "dev", IFNAME, "mode", "tap")
        ns.ip("addr", "add", f"{HOST_IP}/24", "dev", IFNAME)
        ns.ip("link", "set", IFNAME, "up")
        for queues in backends:
            rig = Rig(ns, queues)
            try:
                for frame, hdr, name in tx_cases:
                    frames, busy, wall = rig.transmit(frame, hdr, args.depth, args.seconds)
                    for label, spent in ((queues, busy), (f"{queues} wall", wall)):
                        if spent is None:
                            continue
                        pps = frames / spent
                        tx_rows.append(f"| {name} | {label} | {pps:,.0f} | "
                                       f"{pps * len(frame) * 8 / 1e6:,.0f} | "
                                       f"{spent / frames * 1e6:.2f} |")
                for size in (60, 1514):
                    frames, wall, busy, sent, dropped = rig.receive(size, args.seconds)
                    pps = frames / wall
                    rx_rows.append(f"| {size}-byte | {queues} | {pps:,.0f} | "
                                   f"{pps * size * 8 / 1e6:,.0f} | {busy / frames * 1e6:.1f} | "
                                   f"{sent / wall:,.0f} | {dropped:,} |")
            finally:
                rig.close()
    print(f"transmit, {args.depth} chains per notification; rates per second of "
          "device time: python = process(1) + should_notify; native = the C engine's busy "
          "time (busy_ns); native wall = kick eventfd -> the engine's interrupt for the batch")
    print("| frames | queue | frames/s | Mbit/s | µs/frame |")
    print("| --- | --- | ---: | ---: | ---: |")
    print("\n".join(sorted(tx_rows, key=lambda r: [c for c in tx_cases if f"| {c[2]} |" in r]
                           and tx_cases.index(next(c for c in tx_cases if f"| {c[2]} |" in r)))))
    print("\nreceive, 256 mergeable buffers of 1526 bytes; rates per second of wall "
          "time (tap thread, process(0) and the harness's buffer refills)")
    print("| frames | queue | frames/s | Mbit/s | process(0) µs/frame | offered/s | dropped by the tap |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    print("\n".join(sorted(rx_rows, key=lambda r: int(r.split("-byte")[0].strip("| ")))))

if __name__ == "__main__":
    main()
