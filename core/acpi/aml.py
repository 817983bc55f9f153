"""A small AML encoder (ACPI 6.x, section 20): just what kvmkit's DSDT needs.

Every function returns the encoded bytes of one term, so a namespace is
written as nested calls::

    scope("\\_SB", device("COM1", name("_HID", eisaid("PNP0501")),
                                  name("_CRS", resource_template(io(0x3F8, 8), irq_no_flags(4)))))

Integers pick the shortest encoding; names are NameSegs (four characters,
padded with '_') or paths with '\\' and '.'.
"""
from __future__ import annotations

import struct

# Opcodes (20.3)
ZERO_OP, ONE_OP, ONES_OP = 0x00, 0x01, 0xFF
BYTE_PREFIX, WORD_PREFIX, DWORD_PREFIX, STRING_PREFIX, QWORD_PREFIX = 0x0A, 0x0B, 0x0C, 0x0D, 0x0E
NAME_OP, SCOPE_OP, BUFFER_OP, PACKAGE_OP, METHOD_OP = 0x08, 0x10, 0x11, 0x12, 0x14
DUAL_NAME_PREFIX, MULTI_NAME_PREFIX, ROOT_CHAR, PARENT_PREFIX = 0x2E, 0x2F, 0x5C, 0x5E
LOCAL0_OP, ARG0_OP = 0x60, 0x68
STORE_OP, NOTIFY_OP, LEQUAL_OP, IF_OP, RETURN_OP = 0x70, 0x86, 0x93, 0xA0, 0xA4
EXT_OP_PREFIX = 0x5B
EXT_OP_REGION, EXT_FIELD, EXT_DEVICE = 0x80, 0x81, 0x82

# Operation region spaces (19.6.100)
SYSTEM_MEMORY, SYSTEM_IO = 0x00, 0x01
# Field flags: access type (bits 0-3), lock rule (bit 4), update rule (bits 5-6)
ACCESS_ANY, ACCESS_BYTE = 0, 1


class AmlError(ValueError):
    """A value AML cannot encode (a bad name, an integer out of range)."""


# -- package length (20.2.4) -----------------------------------------------------------
def pkg_length(body_len: int) -> bytes:
    """The PkgLength for a body of ``body_len`` bytes; it counts its own bytes too."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0x0F)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise AmlError(f"AML object of {body_len} bytes exceeds PkgLength's 256 MiB")


def _with_length(body: bytes) -> bytes:
    return pkg_length(len(body)) + body


# -- names (20.2.2) ---------------------------------------------------------------------
def name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4 or not (seg[0].isupper() or seg[0] == "_") \
            or not all(c.isupper() or c.isdigit() or c == "_" for c in seg) or not seg.isascii():
        raise AmlError(f"bad AML name segment {seg!r} (1-4 of A-Z, 0-9, _; not starting with a digit)")
    return seg.ljust(4, "_").encode("ascii")


def name_string(path: str) -> bytes:
    """A NameString: ``FOO``, ``\\_SB.PCI0``, ``^PWRB``."""
    prefix = b""
    if path.startswith("\\"):
        prefix, path = bytes([ROOT_CHAR]), path[1:]
    else:
        while path.startswith("^"):
            prefix, path = prefix + bytes([PARENT_PREFIX]), path[1:]
    if not path:
        return prefix + b"\x00"
    segs = [name_seg(s) for s in path.split(".")]
    if len(segs) == 1:
        return prefix + segs[0]
    if len(segs) == 2:
        return prefix + bytes([DUAL_NAME_PREFIX]) + b"".join(segs)
    if len(segs) > 255:
        raise AmlError(f"name path {path!r} has more than 255 segments")
    return prefix + bytes([MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)


# -- data (20.2.3) -----------------------------------------------------------------------
def integer(value: int) -> bytes:
    """The shortest encoding of an unsigned 64-bit integer."""
    if not 0 <= value < 1 << 64:
        raise AmlError(f"AML integers are unsigned 64-bit, got {value}")
    if value == 0:
        return bytes([ZERO_OP])
    if value == 1:
        return bytes([ONE_OP])
    if value < 1 << 8:
        return bytes([BYTE_PREFIX, value])
    if value < 1 << 16:
        return bytes([WORD_PREFIX]) + struct.pack("<H", value)
    if value < 1 << 32:
        return bytes([DWORD_PREFIX]) + struct.pack("<I", value)
    return bytes([QWORD_PREFIX]) + struct.pack("<Q", value)


def string(text: str) -> bytes:
    raw = text.encode("ascii")
    if b"\0" in raw or any(b > 0x7F for b in raw):
        raise AmlError(f"AML strings are ASCII without NUL: {text!r}")
    return bytes([STRING_PREFIX]) + raw + b"\0"


def eisaid(id_: str) -> bytes:
    """A compressed EISA id (``PNP0A03``) as the DWord integer _HID takes."""
    if len(id_) != 7 or not all("A" <= c <= "Z" for c in id_[:3]):
        raise AmlError(f"EISA ids are three letters and four hex digits, got {id_!r}")
    try:
        product = int(id_[3:], 16)
    except ValueError:
        raise AmlError(f"EISA ids are three letters and four hex digits, got {id_!r}") from None
    vendor = ((ord(id_[0]) - 0x40) << 10) | ((ord(id_[1]) - 0x40) << 5) | (ord(id_[2]) - 0x40)
    return integer(struct.unpack("<I", struct.pack(">HH", vendor, product))[0])


def _data(value) -> bytes:
    """A Python value as a DataRefObject: int, str, or bytes already encoded."""
    if isinstance(value, bool):
        raise AmlError("AML has no booleans: use 0 or 1")
    if isinstance(value, int):
        return integer(value)
    if isinstance(value, str):
        return string(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise AmlError(f"cannot encode {type(value).__name__} {value!r} as AML data")


def buffer(data: bytes) -> bytes:
    return bytes([BUFFER_OP]) + _with_length(integer(len(data)) + bytes(data))


def package(*elements) -> bytes:
    if len(elements) > 255:
        raise AmlError("a Package holds at most 255 elements")
    return bytes([PACKAGE_OP]) + _with_length(bytes([len(elements)]) + b"".join(map(_data, elements)))


# -- named objects and namespace modifiers (20.2.5) --------------------------------------
def name(path: str, value) -> bytes:
    return bytes([NAME_OP]) + name_string(path) + _data(value)


def scope(path: str, *terms: bytes) -> bytes:
    return bytes([SCOPE_OP]) + _with_length(name_string(path) + b"".join(terms))


def device(path: str, *terms: bytes) -> bytes:
    return bytes([EXT_OP_PREFIX, EXT_DEVICE]) + _with_length(name_string(path) + b"".join(terms))


def method(path: str, args: int, *terms: bytes, serialized: bool = False) -> bytes:
    if not 0 <= args <= 7:
        raise AmlError(f"a method takes 0-7 arguments, not {args}")
    flags = args | (0x08 if serialized else 0)
    return bytes([METHOD_OP]) + _with_length(name_string(path) + bytes([flags]) + b"".join(terms))


def operation_region(path: str, space: int, offset: int, length: int) -> bytes:
    return bytes([EXT_OP_PREFIX, EXT_OP_REGION]) + name_string(path) + bytes([space]) \
        + integer(offset) + integer(length)


def field(region: str, *fields: tuple[str, int], access: int = ACCESS_BYTE) -> bytes:
    """Field (region, access, NoLock, Preserve) { NAME, bits, ... }."""
    body = name_string(region) + bytes([access])
    for seg, bits in fields:
        body += name_seg(seg) + _field_length(bits)
    return bytes([EXT_OP_PREFIX, EXT_FIELD]) + _with_length(body)


def _field_length(bits: int) -> bytes:
    # A field's width is a PkgLength-style number that does not count itself.
    if bits < 0x40:
        return bytes([bits])
    for extra in (1, 2, 3):
        if bits < 1 << (4 + 8 * extra):
            return bytes([(extra << 6) | (bits & 0x0F)]) + (bits >> 4).to_bytes(extra, "little")
    raise AmlError(f"field of {bits} bits is too wide")


# -- statements and expressions (20.2.5.3, 20.2.5.4) ------------------------------------
def arg(n: int) -> bytes:
    return bytes([ARG0_OP + n])


def local(n: int) -> bytes:
    return bytes([LOCAL0_OP + n])


def ref(path: str) -> bytes:
    """A reference to a named object, as a term argument or target."""
    return name_string(path)


def store(value: bytes, target: bytes) -> bytes:
    return bytes([STORE_OP]) + value + target


def notify(target: str, value: int) -> bytes:
    return bytes([NOTIFY_OP]) + name_string(target) + integer(value)


def lequal(a: bytes, b: bytes) -> bytes:
    return bytes([LEQUAL_OP]) + a + b


def if_(predicate: bytes, *terms: bytes) -> bytes:
    return bytes([IF_OP]) + _with_length(predicate + b"".join(terms))


def return_(value: bytes) -> bytes:
    return bytes([RETURN_OP]) + value


# -- resource descriptors (6.4) -----------------------------------------------------------
END_TAG = 0x79
IO_TAG, IRQ_TAG = 0x47, 0x22
MEMORY32_FIXED_TAG, DWORD_ADDRESS_TAG, WORD_ADDRESS_TAG = 0x86, 0x87, 0x88
EXTENDED_IRQ_TAG, QWORD_ADDRESS_TAG = 0x89, 0x8A
RESOURCE_MEMORY, RESOURCE_IO, RESOURCE_BUS = 0, 1, 2
# General flags of an address space descriptor: min and max fixed; bit 0 clear
# means the device produces the range (a bridge window), set that it consumes it.
_MIN_MAX_FIXED = 0x0C
_CONSUMER = 0x01


def _large(tag: int, body: bytes) -> bytes:
    return bytes([tag]) + struct.pack("<H", len(body)) + body


def io(base: int, length: int, align: int = 1) -> bytes:
    """IO (Decode16, base, base, align, length): a fixed range of ports."""
    if not 0 <= base <= 0xFFFF or not 1 <= length <= 0xFF:
        raise AmlError(f"IO descriptor: base {base:#x} length {length}")
    return struct.pack("<BBHHBB", IO_TAG, 1, base, base, align, length)


def irq_no_flags(*irqs: int) -> bytes:
    """IRQNoFlags () {irqs}: ISA interrupts, edge-triggered, active high."""
    mask = 0
    for n in irqs:
        if not 0 <= n < 16:
            raise AmlError(f"IRQ descriptor takes ISA IRQs 0-15, got {n}")
        mask |= 1 << n
    return struct.pack("<BH", IRQ_TAG, mask)


def interrupt(*gsis: int, edge: bool = False, active_low: bool = False, shared: bool = False) -> bytes:
    """Interrupt (ResourceConsumer, Edge|Level, ActiveLow|ActiveHigh, Shared|Exclusive) {gsis}."""
    flags = _CONSUMER | (0x02 if edge else 0) | (0x04 if active_low else 0) | (0x08 if shared else 0)
    return _large(EXTENDED_IRQ_TAG, bytes([flags, len(gsis)]) + b"".join(struct.pack("<I", g) for g in gsis))


def memory32_fixed(base: int, length: int, writable: bool = True) -> bytes:
    return _large(MEMORY32_FIXED_TAG, struct.pack("<BII", int(writable), base, length))


def _address(tag: int, fmt: str, kind: int, type_flags: int, lo: int, hi: int, consumer: bool) -> bytes:
    flags = _MIN_MAX_FIXED | (_CONSUMER if consumer else 0)
    if hi < lo:
        raise AmlError(f"address range {lo:#x}-{hi:#x} is empty")
    # granularity, minimum, maximum, translation offset, length
    return _large(tag, struct.pack("<BBB", kind, flags, type_flags)
                  + struct.pack("<" + fmt * 5, 0, lo, hi, 0, hi - lo + 1))


def word_bus_number(lo: int, hi: int) -> bytes:
    """WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode, 0, lo, hi, 0, n)."""
    return _address(WORD_ADDRESS_TAG, "H", RESOURCE_BUS, 0, lo, hi, False)


def word_io(lo: int, hi: int) -> bytes:
    """WordIO (ResourceProducer, MinFixed, MaxFixed, PosDecode, EntireRange, ...): an I/O window."""
    return _address(WORD_ADDRESS_TAG, "H", RESOURCE_IO, 0x03, lo, hi, False)


def dword_memory(lo: int, hi: int) -> bytes:
    """DWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address(DWORD_ADDRESS_TAG, "I", RESOURCE_MEMORY, 0x01, lo, hi, False)


def qword_memory(lo: int, hi: int) -> bytes:
    """QWordMemory (ResourceProducer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite, ...)."""
    return _address(QWORD_ADDRESS_TAG, "Q", RESOURCE_MEMORY, 0x01, lo, hi, False)


def resource_template(*descriptors: bytes) -> bytes:
    """ResourceTemplate () {...}: a Buffer of descriptors and an end tag (checksum 0)."""
    return buffer(b"".join(descriptors) + bytes([END_TAG, 0]))
