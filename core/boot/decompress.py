"""Decompress a bzImage payload on the host.

The payload is the compressed vmlinux followed by a 4-byte little-endian
uncompressed size (and, for xz, possibly padding). Each decompressor stops at
the end of its stream and ignores what follows.
"""
from __future__ import annotations

import bz2
import lzma
import struct
import zlib

MAX_OUTPUT = 1 << 30     # no vmlinux is near this; bounds corrupt or hostile payloads
LZMA_MEMLIMIT = 1 << 28  # kernels use dictionaries of a few MiB; bounds a garbage header

LZ4_LEGACY_MAGIC = 0x184C2102
LZ4_LEGACY_BLOCK = 8 << 20

# (name, magic) in the order they are tried; lzo is recognised but not decompressed here.
MAGICS = (
    ("gzip", b"\x1f\x8b"),
    ("xz", b"\xfd7zXZ\x00"),
    ("lzma", b"\x5d\x00\x00"),
    ("bzip2", b"BZh"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lz4", struct.pack("<I", LZ4_LEGACY_MAGIC)),
    ("lzo", b"\x89LZO"),
)


class CorruptPayload(Exception):
    """The payload claims a known compression but does not decompress."""


class Unavailable(Exception):
    """No decompressor for this compression on the host (unknown, or its package is missing)."""


def identify(payload: bytes) -> str:
    for name, magic in MAGICS:
        if payload.startswith(magic):
            return name
    return "unknown"


def _stream(decomp, payload: bytes) -> bytes:
    out = decomp.decompress(payload, MAX_OUTPUT)
    if not decomp.eof:
        if len(out) >= MAX_OUTPUT:
            raise CorruptPayload(f"decompresses to more than {MAX_OUTPUT >> 20} MiB")
        raise CorruptPayload("stream ends early (truncated)")
    return out


def _gzip(payload: bytes) -> bytes:
    return _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), payload)


def _xz(payload: bytes) -> bytes:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_XZ, memlimit=LZMA_MEMLIMIT), payload)


def _lzma(payload: bytes) -> bytes:
    return _stream(lzma.LZMADecompressor(format=lzma.FORMAT_ALONE, memlimit=LZMA_MEMLIMIT), payload)


def _bzip2(payload: bytes) -> bytes:
    return _stream(bz2.BZ2Decompressor(), payload)


def _zstd(payload: bytes) -> bytes:
    try:
        import zstandard
    except ImportError:
        raise Unavailable("zstd needs the 'zstandard' package") from None
    d = zstandard.ZstdDecompressor().decompressobj()
    out = d.decompress(payload)
    if not d.eof:
        raise CorruptPayload("stream ends early (truncated)")
    return out


def _lz4_legacy(payload: bytes) -> bytes:
    """lz4 legacy framing: magic, then [u32 compressed size][block] chunks."""
    try:
        import lz4.block
    except ImportError:
        raise Unavailable("lz4 needs the 'lz4' package") from None
    chunks, total, pos = [], 0, 4
    while pos + 4 <= len(payload):
        size = struct.unpack_from("<I", payload, pos)[0]
        pos += 4
        if size == LZ4_LEGACY_MAGIC:          # a concatenated stream starts
            continue
        if pos == len(payload):                # the 4-byte uncompressed-size trailer
            break
        if size == 0 or pos + size > len(payload):
            raise CorruptPayload(f"lz4 block of {size} bytes at offset {pos - 4} runs past the payload")
        chunk = lz4.block.decompress(payload[pos:pos + size], uncompressed_size=LZ4_LEGACY_BLOCK)
        pos += size
        total += len(chunk)
        if total > MAX_OUTPUT:
            raise CorruptPayload(f"decompresses to more than {MAX_OUTPUT >> 20} MiB")
        chunks.append(chunk)
    if not chunks:
        raise CorruptPayload("no lz4 block")
    return b"".join(chunks)


_DECOMPRESSORS = {
    "gzip": _gzip, "xz": _xz, "lzma": _lzma, "bzip2": _bzip2, "zstd": _zstd, "lz4": _lz4_legacy,
}


def decompress(payload: bytes, kind: str) -> bytes:
    """Decompress ``payload`` of compression ``kind`` (from :func:`identify`).

    Raises Unavailable when the host cannot, CorruptPayload when the data is bad.
    """
    fn = _DECOMPRESSORS.get(kind)
    if fn is None:
        raise Unavailable(f"no host decompressor for {kind} payloads")
    try:
        return fn(payload)
    except (Unavailable, CorruptPayload):
        raise
    except Exception as exc:  # zlib.error, LZMAError, OSError, LZ4BlockError, ZstdError, ...
        raise CorruptPayload(f"{type(exc).__name__}: {exc}") from exc
