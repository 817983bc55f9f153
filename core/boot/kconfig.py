"""A kernel image's embedded configuration (CONFIG_IKCONFIG) and what the
host-root guest needs of it.

With CONFIG_IKCONFIG the build puts its ``.config``, gzip'd, between the
markers ``IKCFG_ST`` and ``IKCFG_ED`` in vmlinux; in a bzImage that vmlinux
is the compressed payload, which is decompressed here as the loader does.
"""
from __future__ import annotations

import dataclasses
import zlib

from . import bzimage, decompress, elf

__all__ = ["KconfigError", "embedded_config", "parse", "REQUIRED", "OPTIONAL", "Verdict",
           "check_options"]

START = b"IKCFG_ST"
END = b"IKCFG_ED"
CONFIG_LIMIT = 4 << 20                  # a .config is ~100-300 KiB

# What the host-root guest (kvmkit sandbox, kvmkit run without a kernel)
# cannot boot without; built in (=y): it has no initramfs to load modules.
REQUIRED = (
    ("PCI", "the virtio devices are PCI functions"),
    ("VIRTIO_PCI", "virtio over PCI"),
    ("VIRTIO_FS", "the root file system is the host's / over virtio-fs"),
    ("FUSE_FS", "virtio-fs is a FUSE transport"),
    ("VIRTIO_CONSOLE", "hvc0 and the command's stdio ports"),
    ("DEVTMPFS", "/dev without udev"),
    ("TMPFS", "/tmp, /run and overlays in guest memory"),
    ("PROC_FS", "/proc"),
    ("SYSFS", "finding the ports by name"),
    ("BINFMT_ELF", "running the init and the command"),
)
# Features that need them; missing ones are named, not fatal.
OPTIONAL = (
    ("OVERLAY_FS", "--overlay-rwdir"),
    ("PVPANIC_PCI", "a guest panic's own exit status"),
    ("UNIX98_PTYS", "/dev/pts in the guest"),
    ("RTC_DRV_CMOS", "the host's time in the guest"),
)


class KconfigError(Exception):
    """The image cannot be looked into (one line, names the file)."""


def embedded_config(data: bytes, name: str) -> str | None:
    """The image's ``.config`` text, or None when it has none embedded."""
    vmlinux = data
    if bzimage.is_bzimage(data):
        try:
            hdr = bzimage.parse_header(data, name)
            payload = bzimage._payload(data, hdr, name)
        except Exception as e:
            raise KconfigError(str(e)) from None
        if payload is None:
            raise KconfigError(f"{name}: the bzImage names no payload (boot protocol < 2.08)")
        kind = decompress.identify(payload)
        try:
            vmlinux = decompress.decompress(payload, kind)
        except (decompress.Unavailable, decompress.CorruptPayload) as e:
            raise KconfigError(f"{name}: cannot decompress its {kind} payload to look for the "
                               f"embedded config: {e}") from None
    elif not elf.is_elf(data):
        raise KconfigError(f"{name}: neither a bzImage nor an ELF vmlinux")
    start = vmlinux.find(START)
    if start < 0:
        return None
    end = vmlinux.find(END, start)
    if end < 0:
        raise KconfigError(f"{name}: the embedded config has no end marker (damaged image)")
    try:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        text = d.decompress(vmlinux[start + len(START):end], CONFIG_LIMIT)
    except zlib.error as e:
        raise KconfigError(f"{name}: the embedded config does not inflate ({e})") from None
    return text.decode("utf-8", "replace")


def parse(text: str) -> dict[str, str]:
    """``CONFIG_X=value`` lines -> {"X": "value"} (unset options are absent)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, _, value = line.partition("=")
            out[key[len("CONFIG_"):]] = value
    return out


@dataclasses.dataclass(frozen=True)
class Verdict:
    missing: tuple[str, ...]            # required options not built in ("X" or "X (=m)")
    missing_optional: tuple[str, ...]   # "X (for what)"

    @property
    def ok(self) -> bool:
        return not self.missing


def check_options(options: dict[str, str]) -> Verdict:
    def state(name):
        v = options.get(name)
        return "" if v == "y" else f"CONFIG_{name}" + (" (=m, a module: no initramfs loads it)"
                                                      if v == "m" else "")
    missing = tuple(s for s in (state(n) for n, _ in REQUIRED) if s)
    optional = tuple(f"CONFIG_{n} ({why})" for n, why in OPTIONAL if options.get(n) != "y")
    return Verdict(missing, optional)
