"""The virtio-blk wire format (virtio 1.2, section 5.2): feature bits, the
configuration structure, request header, discard/write-zeroes segments and
status codes.  Shared by the device model, its tests and the benchmark."""
from __future__ import annotations

import dataclasses
import struct

SECTOR = 512

# Feature bits (5.2.3)
F_SIZE_MAX = 1
F_SEG_MAX = 2
F_GEOMETRY = 4
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_TOPOLOGY = 10
F_CONFIG_WCE = 11
F_MQ = 12
F_DISCARD = 13
F_WRITE_ZEROES = 14

# Request types (5.2.6)
T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_GET_LIFETIME = 10
T_DISCARD = 11
T_WRITE_ZEROES = 13
T_SECURE_ERASE = 14

# Status byte values
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

ID_BYTES = 20                                   # GET_ID answer length
WRITE_ZEROES_FLAG_UNMAP = 1

HEADER = struct.Struct("<IIQ")                  # type, reserved (ioprio), sector
SEGMENT = struct.Struct("<QII")                 # sector, num_sectors, flags

# struct virtio_blk_config up to secure_erase_sector_alignment (72 bytes):
# capacity Q @0, size_max I @8, seg_max I @12, geometry {cylinders H, heads B, sectors B} @16,
# blk_size I @20, topology {physical_block_exp B, alignment_offset B, min_io_size H,
# opt_io_size I} @24, writeback B @32, unused0 B @33, num_queues H @34,
# max_discard_sectors I @36, max_discard_seg I @40, discard_sector_alignment I @44,
# max_write_zeroes_sectors I @48, max_write_zeroes_seg I @52, write_zeroes_may_unmap B @56,
# unused1 3x @57, max_secure_erase_sectors I @60, max_secure_erase_seg I @64,
# secure_erase_sector_alignment I @68
CONFIG = struct.Struct("<QII HBB I BBHI BxH IIIII B3x III")
assert CONFIG.size == 72


@dataclasses.dataclass(frozen=True)
class BlkConfig:
    """The device configuration structure (fields a feature does not cover are 0)."""

    capacity: int
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = 0
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: int = 0
    num_queues: int = 0
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: int = 0
    max_secure_erase_sectors: int = 0
    max_secure_erase_seg: int = 0
    secure_erase_sector_alignment: int = 0

    def pack(self) -> bytes:
        return CONFIG.pack(*dataclasses.astuple(self))

    @classmethod
    def unpack(cls, data: bytes) -> "BlkConfig":
        return cls(*CONFIG.unpack(data))
