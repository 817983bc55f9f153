"""virtio-net wire formats (virtio 1.2, section 5.1).

Feature bits, the 12-byte ``virtio_net_hdr_v1`` that precedes every frame on
both queues, the configuration space and the control-queue commands.  Pure
data: no device state here.
"""
from __future__ import annotations

import dataclasses
import struct

# -- feature bits (5.1.3) -------------------------------------------------------------------
F_CSUM = 0                  # device takes frames with a partial checksum
F_GUEST_CSUM = 1            # driver takes frames with a partial checksum
F_MTU = 3                   # config.mtu is valid
F_MAC = 5                   # config.mac is valid
F_GUEST_TSO4 = 7            # driver takes TCPv4 GSO frames
F_GUEST_TSO6 = 8
F_GUEST_ECN = 9
F_GUEST_UFO = 10
F_HOST_TSO4 = 11            # device takes TCPv4 GSO frames
F_HOST_TSO6 = 12
F_HOST_ECN = 13
F_HOST_UFO = 14
F_MRG_RXBUF = 15            # a received frame may span several receive buffers
F_STATUS = 16               # config.status is valid
F_CTRL_VQ = 17              # the control queue exists
F_CTRL_MAC_ADDR = 23        # VIRTIO_NET_CTRL_MAC_ADDR_SET


def bits(*numbers: int) -> int:
    mask = 0
    for n in numbers:
        mask |= 1 << n
    return mask


# Offloads a backend may be able to honour; the device offers the ones it can.
HOST_OFFLOADS = bits(F_CSUM, F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN, F_HOST_UFO)
GUEST_OFFLOADS = bits(F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN, F_GUEST_UFO)
OFFLOADS = HOST_OFFLOADS | GUEST_OFFLOADS

# -- queues (5.1.2) -----------------------------------------------------------------------
RX, TX, CTRL = 0, 1, 2

# -- the header (5.1.6) ----------------------------------------------------------------------
HDR = struct.Struct("<BBHHHHH")   # flags gso_type hdr_len gso_size csum_start csum_offset num_buffers
HDR_SIZE = HDR.size                # 12: VERSION_1 always has num_buffers
assert HDR_SIZE == 12

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

# What each GSO type needs negotiated, on transmit (host) and on receive (guest).
HOST_GSO_FEATURE = {GSO_TCPV4: F_HOST_TSO4, GSO_TCPV6: F_HOST_TSO6, GSO_UDP: F_HOST_UFO}
GUEST_GSO_FEATURE = {GSO_TCPV4: F_GUEST_TSO4, GSO_TCPV6: F_GUEST_TSO6, GSO_UDP: F_GUEST_UFO}

# -- frame sizes -------------------------------------------------------------------------------
ETH_HLEN = 14
VLAN_HLEN = 4
MIN_FRAME = ETH_HLEN                        # a frame must at least hold its Ethernet header
MAX_GSO_FRAME = ETH_HLEN + VLAN_HLEN + 65535  # an IPv4/IPv6 packet of 64 KiB, tagged


def max_plain_frame(mtu: int) -> int:
    """The largest frame without GSO for an MTU (a VLAN tag allowed, as Linux does)."""
    return ETH_HLEN + VLAN_HLEN + mtu


@dataclasses.dataclass(frozen=True)
class NetHeader:
    """One ``virtio_net_hdr_v1``."""

    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, data) -> "NetHeader":
        return cls(*HDR.unpack_from(data, 0))

    def pack(self) -> bytes:
        return HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                        self.csum_start, self.csum_offset, self.num_buffers)

    @property
    def needs_csum(self) -> bool:
        return bool(self.flags & HDR_F_NEEDS_CSUM)

    @property
    def gso(self) -> int:
        """The GSO type without the ECN bit."""
        return self.gso_type & ~GSO_ECN

    def replace(self, **changes) -> "NetHeader":
        return dataclasses.replace(self, **changes)


# -- configuration space (5.1.4) -----------------------------------------------------------------
CONFIG = struct.Struct("<6sHHH")     # mac, status, max_virtqueue_pairs, mtu
S_LINK_UP = 1


def config_bytes(mac: bytes, status: int, mtu: int) -> bytes:
    return CONFIG.pack(bytes(mac), status, 1, mtu)


# -- control queue (5.1.6.5) ------------------------------------------------------------------
CTRL_HDR = struct.Struct("<BB")      # class, command
CTRL_MAC = 1
CTRL_MAC_ADDR_SET = 1
CTRL_OK = 0
CTRL_ERR = 1
