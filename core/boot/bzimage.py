"""Load a bzImage: decompress its payload on the host, or enter its own decompressor."""
from __future__ import annotations

import struct
from typing import NamedTuple

from . import elf, layout
from .errors import BootError
from .image import KernelImage

BOOT_FLAG = 0xAA55
HDRS = b"HdrS"
MIN_PROTOCOL = 0x0206
SETUP_HEADER_START = 0x1F1
SETUP_HEADER_MAX_END = SETUP_HEADER_START + 144   # the header can never be longer
LOADED_HIGH = 0x01
XLF_KERNEL_64 = 0x01
ENTRY_64_OFFSET = 0x200   # startup_64 of the protected-mode kernel


class SetupHeader(NamedTuple):
    version: int
    setup_sects: int              # 0 in the file means 4
    header_end: int               # 0x202 + byte at 0x201, capped at 144 bytes of header
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable_kernel: bool
    xloadflags: int               # 0 before protocol 2.12
    cmdline_size: int
    payload_offset: int | None    # protocol 2.08+
    payload_length: int | None
    pref_address: int | None      # protocol 2.10+
    init_size: int | None

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel."""
        return (self.setup_sects + 1) * 512


def is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x206 and struct.unpack_from("<H", data, 0x1FE)[0] == BOOT_FLAG


def _u(data: bytes, off: int, size: int) -> int:
    return int.from_bytes(data[off:off + size], "little")


def parse_header(data: bytes, name: str) -> SetupHeader:
    if not is_bzimage(data):
        raise BootError(f"{name}: no boot flag 0xAA55 at 0x1FE: not a bzImage")
    if data[0x202:0x206] != HDRS:
        raise BootError(f"{name}: no 'HdrS' setup header at 0x202 (boot protocol < 2.00): "
                        f"use a kernel with boot protocol >= 2.06")
    if len(data) < 0x268:
        raise BootError(f"{name}: file ends inside the setup header (truncated)")
    version = _u(data, 0x206, 2)
    if version < MIN_PROTOCOL:
        raise BootError(f"{name}: boot protocol {version >> 8}.{version & 0xFF:02d} is too old: "
                        f"kvmkit needs 2.06 or later (Linux 2.6.22+)")
    sects = data[0x1F1] or 4
    header_end = min(0x202 + data[0x201], SETUP_HEADER_MAX_END)
    if header_end < 0x23C:
        raise BootError(f"{name}: setup header ends at {header_end:#x}, too short for protocol "
                        f"{version >> 8}.{version & 0xFF:02d} (corrupt)")
    hdr = SetupHeader(
        version=version, setup_sects=sects, header_end=header_end,
        loadflags=data[0x211],
        initrd_addr_max=_u(data, 0x22C, 4),
        kernel_alignment=_u(data, 0x230, 4),
        relocatable_kernel=bool(data[0x234]),
        xloadflags=_u(data, 0x236, 2) if version >= 0x020C else 0,
        cmdline_size=_u(data, 0x238, 4),
        payload_offset=_u(data, 0x248, 4) if version >= 0x0208 else None,
        payload_length=_u(data, 0x24C, 4) if version >= 0x0208 else None,
        pref_address=_u(data, 0x258, 8) if version >= 0x020A else None,
        init_size=_u(data, 0x260, 4) if version >= 0x020A else None,
    )
    if len(data) <= hdr.kernel_offset:
        raise BootError(f"{name}: file ends inside the {sects}-sector real-mode setup (truncated)")
    return hdr


def _payload(data: bytes, hdr: SetupHeader, name: str) -> bytes | None:
    if not hdr.payload_offset or not hdr.payload_length:
        return None
    start = hdr.kernel_offset + hdr.payload_offset
    if start + hdr.payload_length > len(data):
        raise BootError(f"{name}: the compressed payload runs past the end of the file (truncated)")
    return data[start:start + hdr.payload_length]


def _with_header(img: KernelImage, data: bytes, hdr: SetupHeader, **extra) -> KernelImage:
    return KernelImage(entry=img.entry, start=img.start, end=img.end, how=img.how,
                       header=bytes(data[SETUP_HEADER_START:hdr.header_end]),
                       cmdline_size=hdr.cmdline_size,
                       initrd_addr_max=hdr.initrd_addr_max or layout.DEFAULT_INITRD_ADDR_MAX,
                       **extra)


def load(mem, data: bytes, name: str) -> KernelImage:
    hdr = parse_header(data, name)
    payload = _payload(data, hdr, name)
    if payload is None:
        reason = "the setup header names no payload (protocol < 2.08, or payload_length 0)"
    else:
        from . import decompress          # bz2, lzma, zlib: only for a bzImage
        kind = decompress.identify(payload)
        try:
            vmlinux = decompress.decompress(payload, kind)
        except decompress.Unavailable as exc:
            reason = str(exc)
        except decompress.CorruptPayload as exc:
            raise BootError(f"{name}: the {kind} payload is corrupt ({exc}): the file is damaged, re-install the kernel") from None
        else:
            if elf.is_elf(vmlinux):
                img = elf.load(mem, vmlinux, f"{name} (decompressed {kind} payload)",
                               how=f"bzImage, {kind} payload decompressed on the host, vmlinux ELF entered directly")
                return _with_header(img, data, hdr)
            reason = f"the {kind} payload does not decompress to an ELF vmlinux"
    return _load_protected_mode(mem, data, hdr, name, reason)


def _load_protected_mode(mem, data: bytes, hdr: SetupHeader, name: str, reason: str) -> KernelImage:
    """Copy the protected-mode kernel and enter the bzImage's own 64-bit entry."""
    fix = "boot the kernel's vmlinux, or install the decompressor package"
    if not hdr.xloadflags & XLF_KERNEL_64:
        raise BootError(f"{name}: {reason}, and the bzImage has no 64-bit entry (XLF_KERNEL_64 unset): {fix}")
    if not hdr.loadflags & LOADED_HIGH:
        raise BootError(f"{name}: {reason}, and the image is a zImage (not loaded high): {fix}")
    if hdr.relocatable_kernel and hdr.pref_address:
        align = hdr.kernel_alignment or layout.DEFAULT_KERNEL_ALIGNMENT
        load_addr = -(-hdr.pref_address // align) * align
    else:
        load_addr = layout.HIGH_MEMORY_START
    kernel = memoryview(data)[hdr.kernel_offset:]
    need = max(hdr.init_size or 0, len(kernel))
    if not mem.contains(load_addr, need):
        raise BootError(f"{name}: memory too small for the kernel: needs {-(-(load_addr + need) // layout.MIB)} MiB, "
                        f"machine has {mem.size // layout.MIB}: give the machine more memory")
    mem.write(load_addr, kernel)
    img = KernelImage(entry=load_addr + ENTRY_64_OFFSET, start=load_addr, end=load_addr + need,
                      how=f"bzImage's own decompressor via its 64-bit entry ({reason})")
    return _with_header(img, data, hdr, code32_start=load_addr)
