"""Ethernet addresses: parsing the ``mac`` key and the stable default."""
from __future__ import annotations

import hashlib
import re

__all__ = ["parse_mac", "format_mac", "default_mac"]

_MAC = re.compile(r"^[0-9a-fA-F]{2}([:-])[0-9a-fA-F]{2}(\1[0-9a-fA-F]{2}){4}$")


def parse_mac(text: str) -> bytes:
    """Six bytes from "52:54:00:12:34:56" (or with dashes).  ValueError for
    anything else, and for an address a NIC cannot own (multicast or zero)."""
    if not isinstance(text, str) or not _MAC.match(text.strip()):
        raise ValueError(f"{text!r} is not a MAC address such as 52:54:00:12:34:56")
    raw = bytes(int(part, 16) for part in re.split(r"[:-]", text.strip()))
    if raw[0] & 1:
        raise ValueError(f"{text} is a multicast address (the low bit of its first octet is "
                         "set); a NIC needs a unicast one, e.g. 52:54:00:12:34:56")
    if raw == bytes(6):
        raise ValueError("00:00:00:00:00:00 is not a usable MAC address")
    return raw


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def default_mac(machine_name: str, instance: str) -> bytes:
    """A locally administered unicast address derived from the machine's name
    and the device's instance name ("virtio-net.0"): the same machine gets
    the same address on every run, two NICs of one machine differ."""
    digest = hashlib.sha256(f"kvmkit\0{machine_name}\0{instance}".encode("utf-8",
                                                                      "surrogateescape")).digest()
    first = (digest[0] & 0xFC) | 0x02            # unicast, locally administered
    return bytes((first, *digest[1:6]))
