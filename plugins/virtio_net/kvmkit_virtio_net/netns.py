"""Throwaway network namespaces with a tap, for tests and benchmarks.

:class:`NetNamespace` creates a namespace with ``ip netns add`` (root, or
CAP_SYS_ADMIN and CAP_NET_ADMIN, is needed), runs ``ip`` commands in it, and
creates sockets and opens taps *inside* it from this process: a thread
enters the namespace (``setns`` changes only the calling thread), makes the
socket or opens /dev/net/tun, and ends; the descriptor stays in the
namespace and works from any thread.  Traffic stays inside the namespace.

    with NetNamespace() as ns:
        ns.ip("tuntap", "add", "dev", "tap0", "mode", "tap")
        ns.ip("addr", "add", "192.168.231.1/24", "dev", "tap0")
        tap = ns.call(open_tap, "tap0")
"""
from __future__ import annotations

import ctypes
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
import time

__all__ = ["NetNamespace", "NetnsUnavailable", "available", "ping"]

CLONE_NEWNET = 0x40000000


class NetnsUnavailable(Exception):
    """This process cannot create network namespaces here."""


def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc


def available() -> str | None:
    """None if namespaces can be made here, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's ip command is not installed"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    try:
        with NetNamespace():
            pass
    except NetnsUnavailable as e:
        return str(e)
    return None


class NetNamespace:
    def __init__(self, prefix: str = "kvmkit-t"):
        self.name = f"{prefix}{secrets.token_hex(4)}"
        self._fd = None
        r = subprocess.run(["ip", "netns", "add", self.name], capture_output=True, text=True)
        if r.returncode != 0:
            raise NetnsUnavailable(f"ip netns add {self.name}: {r.stderr.strip()}")
        try:
            self._fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def ip(self, *args: str) -> str:
        """Run ``ip -n NAME ARGS``; its output, or RuntimeError with its message."""
        r = subprocess.run(["ip", "-n", self.name, *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"ip -n {self.name} {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def exec_prefix(self) -> list[str]:
        """A command prefix that runs a program inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def call(self, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on a thread inside the namespace; its result
        (or its exception)."""
        result: dict = {}

        def run():
            try:
                if _libc().setns(self._fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
                result["value"] = fn(*args, **kwargs)
            except BaseException as e:
                result["error"] = e

        t = threading.Thread(target=run, name=f"netns:{self.name}")
        t.start()
        t.join()
        if "error" in result:
            raise result["error"]
        return result["value"]

    def socket(self, *args) -> socket.socket:
        return self.call(socket.socket, *args)

    def counters(self, ifname: str) -> dict[str, int]:
        """The interface's statistics (rx_packets, tx_dropped, ...) in the namespace."""
        import json
        data = json.loads(self.ip("-s", "-j", "link", "show", "dev", ifname))[0]["stats64"]
        out = {}
        for direction in ("rx", "tx"):
            for key, value in data[direction].items():
                out[f"{direction}_{key}"] = value
        return out

    def wait_up(self, ifname: str, timeout: float = 5.0) -> None:
        """Wait until ``ifname`` is operationally up: a tap's carrier comes on
        when a process attaches, and until the kernel's link watch has
        noticed (up to a second later) it drops what it sends there."""
        import json
        deadline = time.monotonic() + timeout
        while True:
            info = json.loads(self.ip("-j", "link", "show", "dev", ifname))[0]
            if info.get("operstate") == "UP":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ifname} in {self.name} is still {info.get('operstate')}")
            time.sleep(0.02)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.name:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
            self.name = ""

    def __enter__(self) -> "NetNamespace":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _icmp_checksum(data: bytes) -> int:
    from .checksum import internet_checksum
    return internet_checksum(data)


def ping(ns: NetNamespace, address: str, count: int = 3, timeout: float = 10.0,
         interval: float = 0.5) -> list[float]:
    """ICMP echo requests from inside ``ns`` to ``address``; the round-trip
    times (seconds) of the replies that came back within ``timeout``."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    rtts: list[float] = []
    now = time.monotonic()
    deadline, next_send, seq = now + timeout, now, 0
    try:
        while now < deadline and (seq < count or sent):
            if seq < count and now >= next_send:
                body = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + b"kvmkit-ping"
                body = body[:2] + struct.pack("!H", _icmp_checksum(body)) + body[4:]
                sock.sendto(body, (address, 0))
                sent[seq] = now
                seq += 1
                next_send = now + interval
            wake = next_send if seq < count else deadline
            sock.settimeout(max(min(wake, deadline) - time.monotonic(), 0.001))
            try:
                data, (src, _) = sock.recvfrom(2048)
            except (socket.timeout, TimeoutError):
                data = None
            now = time.monotonic()
            if not data or len(data) < 28:
                continue
            ihl = (data[0] & 0xF) * 4
            kind, _, _, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
            if src == address and kind == 0 and rid == ident and rseq in sent:
                rtts.append(now - sent.pop(rseq))
    finally:
        sock.close()
    return rtts
