"""Tap devices: open one through /dev/net/tun with a virtio-net header on
every frame, and switch its offloads.

A tap opened with IFF_VNET_HDR reads and writes each frame behind a
``virtio_net_hdr``; with TUNSETVNETHDRSZ 12 that is exactly the virtio 1.x
header the guest uses (``num_buffers`` included), so frames pass between the
guest's rings and the tap without reformatting.  TUNSETOFFLOAD says what the
*reader* (here: the guest) accepts: partial checksums and which GSO types.

Attaching to an existing tap that belongs to another user or group needs
CAP_NET_ADMIN (create it for this user: ``ip tuntap add dev NAME mode tap
user USER``); creating one always needs it.  Every failure is a :class:`TapError` that says what to do.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

__all__ = ["Tap", "TapError", "open_tap", "tun_offload_flags", "TUN_F_CSUM", "TUN_F_TSO4",
           "TUN_F_TSO6", "TUN_F_TSO_ECN", "TUN_F_UFO", "IFNAMSIZ"]

TUN_PATH = "/dev/net/tun"


def _ioc(direction: int, kind: str, number: int, size: int) -> int:
    """Linux's _IOC(dir, type, nr, size) for x86 and most architectures."""
    return (direction << 30) | (size << 16) | (ord(kind) << 8) | number


_IOW, _IOR = 1, 2
TUNSETIFF = _ioc(_IOW, "T", 202, 4)
TUNSETOFFLOAD = _ioc(_IOW, "T", 208, 4)
TUNSETVNETHDRSZ = _ioc(_IOW, "T", 216, 4)
TUNGETVNETHDRSZ = _ioc(_IOR, "T", 215, 4)
SIOCGIFMTU, SIOCSIFMTU = 0x8921, 0x8922
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914

IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_UP = 0x1
IFNAMSIZ = 16

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TUN_F_UFO = 0x10

VNET_HDR_SIZE = 12
_IFREQ_FLAGS = struct.Struct("16sH22x")      # struct ifreq: name, ifr_flags, padding
_IFREQ_INT = struct.Struct("16si20x")         # struct ifreq: name, ifr_mtu, padding


class TapError(Exception):
    """A tap cannot be used as configured (the message says what to do)."""


def tun_offload_flags(csum: bool, tso4: bool, tso6: bool, ecn: bool, ufo: bool) -> int:
    """TUNSETOFFLOAD flags; the kernel ignores the GSO ones without CSUM."""
    if not csum:
        return 0
    return (TUN_F_CSUM | (TUN_F_TSO4 if tso4 else 0) | (TUN_F_TSO6 if tso6 else 0)
            | (TUN_F_TSO_ECN if ecn and (tso4 or tso6) else 0) | (TUN_F_UFO if ufo else 0))


def _check_name(ifname: str) -> bytes:
    raw = ifname.encode("utf-8", "surrogateescape") if isinstance(ifname, str) else b""
    if not raw or len(raw) >= IFNAMSIZ or b"/" in raw or b"\0" in raw or raw.strip() != raw \
            or raw in (b".", b".."):
        raise TapError(f"ifname {ifname!r} is not a network interface name (1-{IFNAMSIZ - 1} "
                       "characters, no '/', no spaces)")
    return raw


def _exists(ifname: str) -> bool:
    try:
        socket.if_nametoindex(ifname)
        return True
    except OSError:
        return False


class Tap:
    """An open tap (non-blocking), with a 12-byte virtio-net header on every frame."""

    def __init__(self, fd: int, ifname: str, created: bool, offloads: int):
        self.fd = fd
        self.ifname = ifname
        self.created = created               # kvmkit created it: it goes away with the fd
        self.supported_offloads = offloads   # TUN_F_* the kernel accepted when probed
        self.offloads = 0                    # what is set now

    def set_offloads(self, flags: int) -> None:
        """TUNSETOFFLOAD, limited to what the kernel accepted when probed."""
        flags &= self.supported_offloads
        fcntl.ioctl(self.fd, TUNSETOFFLOAD, flags)
        self.offloads = flags

    def mtu(self) -> int | None:
        return _interface_mtu(self.ifname)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"Tap({self.ifname!r}, fd={self.fd}{', created' if self.created else ''})"


def _interface_mtu(ifname: str) -> int | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            raw = fcntl.ioctl(s, SIOCGIFMTU, _IFREQ_INT.pack(ifname.encode(), 0))
        return _IFREQ_INT.unpack(raw)[1]
    except OSError:
        return None


def _bring_up(ifname: str, mtu: int | None) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        if mtu is not None:
            fcntl.ioctl(s, SIOCSIFMTU, _IFREQ_INT.pack(ifname.encode(), mtu))
        raw = fcntl.ioctl(s, SIOCGIFFLAGS, _IFREQ_FLAGS.pack(ifname.encode(), 0))
        flags = _IFREQ_FLAGS.unpack(raw)[1]
        fcntl.ioctl(s, SIOCSIFFLAGS, _IFREQ_FLAGS.pack(ifname.encode(), flags | IFF_UP))


def _probe_offloads(fd: int) -> int:
    """The TUN_F_* set this kernel takes (UFO was refused by some kernels)."""
    for flags in (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
                  TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
                  TUN_F_CSUM):
        try:
            fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
            return flags
        except OSError:
            continue
    return 0


def open_tap(ifname: str, *, create: bool = False, mtu: int | None = None) -> Tap:
    """Attach to the tap ``ifname`` (or create it with ``create``; kvmkit then
    sets ``mtu`` on it and brings it up, and it disappears at exit).  The
    offloads start off; :meth:`Tap.set_offloads` turns on what the guest takes."""
    raw = _check_name(ifname)
    exists = _exists(ifname)
    if not exists and not create:
        raise TapError(f"tap device {ifname!r} does not exist: create it first "
                       f"(ip tuntap add dev {ifname} mode tap user $(id -un)) or set "
                       "create = true to let kvmkit create it (needs CAP_NET_ADMIN)")
    try:
        fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TapError(f"{TUN_PATH} does not exist: load the tun module (modprobe tun)") from None
    except OSError as e:
        raise TapError(f"cannot open {TUN_PATH}: {e.strerror}") from None
    try:
        try:
            got = fcntl.ioctl(fd, TUNSETIFF, _IFREQ_FLAGS.pack(raw, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR))
        except OSError as e:
            raise _setiff_error(ifname, exists, e) from None
        name = _IFREQ_FLAGS.unpack(got)[0].rstrip(b"\0").decode("utf-8", "surrogateescape")
        try:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
        except OSError as e:
            raise TapError(f"tap device {name!r}: the kernel refused a {VNET_HDR_SIZE}-byte "
                           f"virtio-net header (TUNSETVNETHDRSZ: {e.strerror})") from None
        offloads = _probe_offloads(fd)
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        if not exists:
            try:
                _bring_up(name, mtu)
            except OSError as e:
                raise TapError(f"tap device {name!r} was created but cannot be configured "
                               f"(MTU {mtu}, up): {e.strerror}") from None
        return Tap(fd, name, created=not exists, offloads=offloads)
    except BaseException:
        os.close(fd)
        raise


def _setiff_error(ifname: str, exists: bool, e: OSError) -> TapError:
    if e.errno == errno.EPERM:
        if exists:
            return TapError(f"tap device {ifname!r}: permission denied: it belongs to another "
                            "user or group; attaching to it needs CAP_NET_ADMIN, or a tap "
                            f"created for this user (ip tuntap add dev {ifname} mode tap "
                            "user $(id -un))")
        return TapError(f"tap device {ifname!r}: permission denied: creating a tap needs "
                        "CAP_NET_ADMIN; create it beforehand for this user "
                        f"(sudo ip tuntap add dev {ifname} mode tap user $(id -un))")
    if e.errno == errno.EINVAL and exists:
        return TapError(f"{ifname!r} exists but is not a tap device (a tun device or another "
                        "kind of interface); name a tap")
    if e.errno == errno.EBUSY:
        return TapError(f"tap device {ifname!r} is in use by another process (a single-queue "
                        "tap takes one user)")
    return TapError(f"tap device {ifname!r}: TUNSETIFF failed: {e.strerror}")
