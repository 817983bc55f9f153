"""The Internet checksum (RFC 1071), for frames whose checksum the guest left
to the device (VIRTIO_NET_HDR_F_NEEDS_CSUM) when the backend cannot take
them that way (user-mode networking wants finished frames).

The 16-bit one's-complement sum is computed with one big-integer remainder:
read as a big-endian integer, the data is ``sum(w_i * 0x10000**i)``, and
``0x10000 = 1 (mod 0xFFFF)``, so the integer modulo 0xFFFF is the sum of its
16-bit words modulo 0xFFFF, which is the one's-complement sum except that
the latter writes a non-zero multiple of 0xFFFF as 0xFFFF.
"""
from __future__ import annotations

__all__ = ["ones_complement_sum", "internet_checksum", "complete_checksum"]


def ones_complement_sum(data) -> int:
    """The 16-bit one's-complement sum of ``data`` (an odd length is padded
    with a zero byte, as RFC 1071 does)."""
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\0"
    value = int.from_bytes(raw, "big")
    folded = value % 0xFFFF
    if folded == 0 and value:
        return 0xFFFF
    return folded


def internet_checksum(data) -> int:
    """The checksum field value for ``data`` (the complement of its sum)."""
    return ~ones_complement_sum(data) & 0xFFFF


def complete_checksum(frame: bytearray, start: int, offset: int) -> None:
    """Finish a partial checksum in place: the 16-bit field at ``start +
    offset`` holds the pseudo-header sum; store the checksum of
    ``frame[start:]`` (field included) there.  A result of 0 is written as
    0xFFFF (the same value in one's complement; 0 means "no checksum" to UDP).
    ValueError if the field is not inside the frame."""
    field = start + offset
    if start < 0 or offset < 0 or field + 2 > len(frame):
        raise ValueError(f"checksum field at {start}+{offset} is outside the {len(frame)}-byte frame")
    value = internet_checksum(memoryview(frame)[start:]) or 0xFFFF
    frame[field:field + 2] = value.to_bytes(2, "big")
