"""A PCI function's 256-byte type-0 configuration header with per-bit write masks.

Every byte has a write mask (bits the guest may change) and a write-1-to-clear
mask (status error bits).  Base address registers (BARs) are plain masked
registers too: the address bits below the BAR's size and the flag bits are
read-only, so the guest's sizing protocol (write all-ones, read back) works
without special cases.  Capabilities are linked from the capabilities pointer
at 0x34, starting at 0x40.

Callbacks (all optional attributes, also constructor keywords):

* ``on_change(event)`` after a write (or :meth:`ConfigSpace.set_bar_address`)
  changed a BAR's address, ``("bar", index, old_address, new_address)``, or
  the command register, ``("command", old_value, new_value)``.
* ``on_capability_write(cap_offset, offset_in_body, size, value)`` after a
  write touched a capability's body; the body already holds the masked result.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

CONFIG_SPACE_SIZE = 256

# Header registers (type 0).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09            # 3 bytes: programming interface, sub-class, base class
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
EXPANSION_ROM = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
CAPABILITIES_START = 0x40

HEADER_TYPE_NORMAL = 0x00

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_BUS_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE

STATUS_INTERRUPT = 1 << 3
STATUS_CAPABILITIES = 1 << 4
STATUS_MASTER_DATA_PARITY_ERROR = 1 << 8
STATUS_SIGNALED_TARGET_ABORT = 1 << 11
STATUS_RECEIVED_TARGET_ABORT = 1 << 12
STATUS_RECEIVED_MASTER_ABORT = 1 << 13
STATUS_SIGNALED_SYSTEM_ERROR = 1 << 14
STATUS_DETECTED_PARITY_ERROR = 1 << 15
STATUS_W1C = (STATUS_MASTER_DATA_PARITY_ERROR | STATUS_SIGNALED_TARGET_ABORT
              | STATUS_RECEIVED_TARGET_ABORT | STATUS_RECEIVED_MASTER_ABORT
              | STATUS_SIGNALED_SYSTEM_ERROR | STATUS_DETECTED_PARITY_ERROR)

# Low, read-only flag bits of a BAR.
BAR_SPACE_IO = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCHABLE = 0x8
BAR_IO_ADDRESS_MASK = 0xFFFF_FFFC
BAR_MEM_ADDRESS_MASK = 0xFFFF_FFF0

BAR_KINDS = ("mem64", "mem32", "io")
MIN_BAR_SIZE = {"mem64": 16, "mem32": 16, "io": 4}
# x86 port space is 16 bits wide: I/O BARs hardwire their upper 16 bits to 0.
MAX_BAR_SIZE = {"mem64": 1 << 63, "mem32": 1 << 31, "io": 256}
ADDRESS_LIMIT = {"mem64": 1 << 64, "mem32": 1 << 32, "io": 1 << 16}


class ConfigSpaceError(ValueError):
    """A device model described an impossible configuration header."""


class Bar(NamedTuple):
    """A snapshot of one BAR: ``index`` is its first slot (a mem64 BAR also uses index + 1)."""
    index: int
    kind: str               # "mem64", "mem32" or "io"
    size: int
    prefetchable: bool
    address: int

    @property
    def is_memory(self) -> bool:
        return self.kind != "io"


@dataclasses.dataclass
class _Capability:
    offset: int
    cap_id: int
    body_size: int
    on_write: Callable[[int, int, int], None] | None
    on_read: Callable[[int, int], None] | None

    @property
    def body_start(self) -> int:
        return self.offset + 2

    @property
    def body_end(self) -> int:
        return self.offset + 2 + self.body_size


def _check_range(name: str, value: int, bits: int) -> None:
    if not 0 <= value < (1 << bits):
        raise ConfigSpaceError(f"{name} {value:#x} does not fit in {bits} bits")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ConfigSpace:
    def __init__(self, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0, interrupt_pin: int = 0, *,
                 on_change: Callable[[tuple], None] | None = None,
                 on_capability_write: Callable[[int, int, int, int], None] | None = None):
        _check_range("vendor_id", vendor_id, 16)
        if vendor_id == 0xFFFF:
            raise ConfigSpaceError("vendor_id 0xffff means 'no device'")
        _check_range("device_id", device_id, 16)
        _check_range("class_code", class_code, 24)
        _check_range("revision", revision, 8)
        _check_range("subsystem_vendor_id", subsystem_vendor_id, 16)
        _check_range("subsystem_id", subsystem_id, 16)
        if not 0 <= interrupt_pin <= 4:
            raise ConfigSpaceError(f"interrupt_pin {interrupt_pin} is not 0 (none) or 1-4 (INTA-INTD)")
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1c = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, tuple[str, int, bool]] = {}     # index -> (kind, size, prefetchable)
        self._caps: list[_Capability] = []
        self._cap_free = CAPABILITIES_START
        self.on_change = on_change
        self.on_capability_write = on_capability_write

        self._put(VENDOR_ID, 2, vendor_id)
        self._put(DEVICE_ID, 2, device_id)
        self._put(REVISION_ID, 1, revision)
        self._put(CLASS_CODE, 3, class_code)
        self._put(HEADER_TYPE, 1, HEADER_TYPE_NORMAL)
        self._put(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(SUBSYSTEM_ID, 2, subsystem_id)
        self._put(INTERRUPT_PIN, 1, interrupt_pin)
        self._set_mask(self._wmask, COMMAND, 2, COMMAND_WRITABLE)
        self._set_mask(self._w1c, STATUS, 2, STATUS_W1C)
        self._set_mask(self._wmask, CACHE_LINE_SIZE, 1, 0xFF)   # no effect, but software expects it to stick
        self._set_mask(self._wmask, INTERRUPT_LINE, 1, 0xFF)

    # -- raw storage -------------------------------------------------------------------------
    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self._data[offset:offset + size], "little")

    def _put(self, offset: int, size: int, value: int) -> None:
        self._data[offset:offset + size] = value.to_bytes(size, "little")

    @staticmethod
    def _set_mask(mask: bytearray, offset: int, size: int, value: int) -> None:
        mask[offset:offset + size] = value.to_bytes(size, "little")

    def poke(self, offset: int, data: bytes) -> None:
        """Device-side store: ignores the write masks and calls no callbacks."""
        if offset < 0 or offset + len(data) > CONFIG_SPACE_SIZE:
            raise ConfigSpaceError(f"poke at {offset:#x}+{len(data)} is outside the config space")
        self._data[offset:offset + len(data)] = data

    # -- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> str:
        """The 256 bytes as the guest left them (hex)."""
        return self._data.hex()

    def restore_state(self, data: str) -> None:
        """Put back what :meth:`save_state` returned, into a function with the
        same layout (same BARs and capabilities), with the side effects the
        guest's writes had: ``on_change`` sees the BARs and command register
        change (so the owner maps the BARs where the guest put them), and
        every capability's ``on_write`` and ``on_capability_write`` are
        replayed with its body (so e.g. MSI-X is enabled again)."""
        raw = bytes.fromhex(data)
        if len(raw) != CONFIG_SPACE_SIZE:
            raise ValueError(f"config space state holds {len(raw)} bytes, not {CONFIG_SPACE_SIZE}")
        for name, offset, size in (("vendor id", VENDOR_ID, 2), ("device id", DEVICE_ID, 2),
                                   ("class code", CLASS_CODE, 3), ("header type", HEADER_TYPE, 1),
                                   ("capabilities pointer", CAPABILITIES_POINTER, 1)):
            if raw[offset:offset + size] != self._data[offset:offset + size]:
                raise ValueError(f"config space state is of another function (its {name} differs)")
        old_command = self.command
        old_bars = {i: self.bar_address(i) for i in self._bars}
        self._data[:] = raw
        self._notify(old_command, old_bars)
        for cap in self._caps:
            for off in range(0, cap.body_size, 4):
                size = min(4, cap.body_size - off)
                value = self._get(cap.body_start + off, size)
                if cap.on_write is not None:
                    cap.on_write(off, size, value)
                if self.on_capability_write is not None:
                    self.on_capability_write(cap.offset, off, size, value)

    # -- guest accesses ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4):
            raise ValueError(f"config space access size {size} is not 1, 2 or 4")
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return (1 << (8 * size)) - 1
        for cap in self._caps:
            if cap.on_read is not None:
                lo, hi = max(offset, cap.body_start), min(offset + size, cap.body_end)
                if lo < hi:
                    cap.on_read(lo - cap.body_start, hi - lo)
        return self._get(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if size not in (1, 2, 4):
            raise ValueError(f"config space access size {size} is not 1, 2 or 4")
        if offset < 0 or offset + size > CONFIG_SPACE_SIZE:
            return
        value &= (1 << (8 * size)) - 1
        old_command = self.command
        old_bars = {i: self.bar_address(i) for i in self._bars}
        data, wmask, w1c = self._data, self._wmask, self._w1c
        for k in range(size):
            a = offset + k
            b = (value >> (8 * k)) & 0xFF
            m = wmask[a]
            data[a] = ((data[a] & ~m) | (b & m)) & ~(b & w1c[a]) & 0xFF
        self._notify(old_command, old_bars)
        for cap in self._caps:
            lo, hi = max(offset, cap.body_start), min(offset + size, cap.body_end)
            if lo < hi:
                part = (value >> (8 * (lo - offset))) & ((1 << (8 * (hi - lo))) - 1)
                if cap.on_write is not None:
                    cap.on_write(lo - cap.body_start, hi - lo, part)
                if self.on_capability_write is not None:
                    self.on_capability_write(cap.offset, lo - cap.body_start, hi - lo, part)

    def _notify(self, old_command: int, old_bars: dict[int, int]) -> None:
        if self.on_change is None:
            return
        new_command = self.command
        if new_command != old_command:
            self.on_change(("command", old_command, new_command))
        for i, old in old_bars.items():
            new = self.bar_address(i)
            if new != old:
                self.on_change(("bar", i, old, new))

    # -- header fields -----------------------------------------------------------------------
    @property
    def vendor_id(self) -> int:
        return self._get(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self._get(DEVICE_ID, 2)

    @property
    def class_code(self) -> int:
        return self._get(CLASS_CODE, 3)

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    @property
    def status(self) -> int:
        return self._get(STATUS, 2)

    @property
    def io_enabled(self) -> bool:
        return bool(self.command & COMMAND_IO)

    @property
    def memory_enabled(self) -> bool:
        return bool(self.command & COMMAND_MEMORY)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & COMMAND_BUS_MASTER)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & COMMAND_INTX_DISABLE)

    @property
    def interrupt_line(self) -> int:
        return self._data[INTERRUPT_LINE]

    @property
    def interrupt_pin(self) -> int:
        return self._data[INTERRUPT_PIN]

    def set_interrupt_status(self, asserted: bool) -> None:
        """Device side: mirror the INTx level into status bit 3 (read-only to the guest)."""
        status = self.status & ~STATUS_INTERRUPT
        self._put(STATUS, 2, status | (STATUS_INTERRUPT if asserted else 0))

    def raise_status(self, bits: int) -> None:
        """Device side: set status error bits, which the guest clears by writing 1s."""
        if bits & ~STATUS_W1C:
            raise ConfigSpaceError(f"status bits {bits & ~STATUS_W1C:#x} are not error bits")
        self._put(STATUS, 2, self.status | bits)

    # -- BARs ----------------------------------------------------------------------------------
    def add_bar(self, index: int, size: int, kind: str, prefetchable: bool = False) -> None:
        if kind not in BAR_KINDS:
            raise ConfigSpaceError(f"BAR kind {kind!r} is not one of {', '.join(BAR_KINDS)}")
        slots = (index, index + 1) if kind == "mem64" else (index,)
        if not 0 <= index or slots[-1] >= BAR_COUNT:
            raise ConfigSpaceError(f"BAR {index} ({kind}) does not fit in BAR slots 0-{BAR_COUNT - 1}")
        for s in slots:
            if self._bar_owner(s) is not None:
                raise ConfigSpaceError(f"BAR slot {s} is already used by BAR {self._bar_owner(s)}")
        if not _is_power_of_two(size) or not MIN_BAR_SIZE[kind] <= size <= MAX_BAR_SIZE[kind]:
            raise ConfigSpaceError(f"BAR {index} size {size:#x} is not a power of two in "
                                   f"{MIN_BAR_SIZE[kind]:#x}-{MAX_BAR_SIZE[kind]:#x} for {kind}")
        if prefetchable and kind == "io":
            raise ConfigSpaceError("I/O BARs cannot be prefetchable")
        offset = BAR0 + 4 * index
        if kind == "io":
            self._put(offset, 4, BAR_SPACE_IO)
            self._set_mask(self._wmask, offset, 4, ~(size - 1) & BAR_IO_ADDRESS_MASK & 0xFFFF)
        else:
            flags = (BAR_MEM_TYPE_64 if kind == "mem64" else 0) | (BAR_MEM_PREFETCHABLE if prefetchable else 0)
            self._put(offset, 4, flags)
            mask = ~(size - 1) & ((1 << 64) - 1 if kind == "mem64" else 0xFFFF_FFFF)
            self._set_mask(self._wmask, offset, 4, mask & BAR_MEM_ADDRESS_MASK)
            if kind == "mem64":
                self._set_mask(self._wmask, offset + 4, 4, mask >> 32)
        self._bars[index] = (kind, size, prefetchable)

    def _bar_owner(self, slot: int) -> int | None:
        for i, (kind, _, _) in self._bars.items():
            if slot == i or (kind == "mem64" and slot == i + 1):
                return i
        return None

    def _bar_spec(self, index: int) -> tuple[str, int, bool]:
        try:
            return self._bars[index]
        except KeyError:
            raise ConfigSpaceError(f"no BAR starts at slot {index}") from None

    def bar_address(self, index: int) -> int:
        kind, _, _ = self._bar_spec(index)
        offset = BAR0 + 4 * index
        if kind == "io":
            return self._get(offset, 4) & BAR_IO_ADDRESS_MASK
        address = self._get(offset, 4) & BAR_MEM_ADDRESS_MASK
        if kind == "mem64":
            address |= self._get(offset + 4, 4) << 32
        return address

    def set_bar_address(self, index: int, address: int) -> None:
        """Firmware-style assignment; calls ``on_change`` when the address changes."""
        kind, size, _ = self._bar_spec(index)
        if address % size or not 0 <= address <= ADDRESS_LIMIT[kind] - size:
            raise ConfigSpaceError(f"BAR {index}: {address:#x} is not a {size:#x}-aligned {kind} address")
        old_command = self.command
        old_bars = {i: self.bar_address(i) for i in self._bars}
        offset = BAR0 + 4 * index
        flags = self._get(offset, 4) & (~BAR_IO_ADDRESS_MASK if kind == "io" else ~BAR_MEM_ADDRESS_MASK)
        self._put(offset, 4, (address & 0xFFFF_FFFF) | flags)
        if kind == "mem64":
            self._put(offset + 4, 4, address >> 32)
        self._notify(old_command, old_bars)

    def bar(self, index: int) -> Bar:
        kind, size, prefetchable = self._bar_spec(index)
        return Bar(index, kind, size, prefetchable, self.bar_address(index))

    def bars(self) -> list[Bar]:
        return [self.bar(i) for i in sorted(self._bars)]

    def decoded_bars(self) -> list[Bar]:
        """The BARs the function decodes now: memory BARs while memory space is
        enabled, I/O BARs while I/O space is enabled."""
        command = self.command
        return [b for b in self.bars()
                if command & (COMMAND_MEMORY if b.is_memory else COMMAND_IO)]

    # -- capabilities ----------------------------------------------------------------------
    def add_capability(self, cap_id: int, body: bytes, writable: bytes | None = None, *,
                       on_write: Callable[[int, int, int], None] | None = None,
                       on_read: Callable[[int, int], None] | None = None) -> int:
        """Link a capability at the end of the list; returns its offset.

        ``body`` follows the 2-byte (id, next) header; ``writable`` holds a
        write mask for each byte of ``body`` (default: all read-only).
        ``on_write(offset_in_body, size, value)`` is called after a guest
        write touched the body (before ``on_capability_write``);
        ``on_read(offset_in_body, size)`` before a guest read of the body, so
        the owner can refresh it with :meth:`poke`.
        """
        _check_range("capability id", cap_id, 8)
        body = bytes(body)
        if writable is None:
            writable = bytes(len(body))
        elif len(writable) != len(body):
            raise ConfigSpaceError(f"capability {cap_id:#x}: write mask has {len(writable)} bytes, "
                                   f"the body {len(body)}")
        offset = (self._cap_free + 3) & ~3
        end = offset + 2 + len(body)
        if end > CONFIG_SPACE_SIZE:
            raise ConfigSpaceError(f"capability {cap_id:#x} ({2 + len(body)} bytes) does not fit: "
                                   f"only {max(CONFIG_SPACE_SIZE - offset, 0)} bytes are left at {offset:#x}")
        self._data[offset] = cap_id
        self._data[offset + 1] = 0
        self._data[offset + 2:end] = body
        self._wmask[offset + 2:end] = writable
        if self._caps:
            self._data[self._caps[-1].offset + 1] = offset
        else:
            self._data[CAPABILITIES_POINTER] = offset
        self._put(STATUS, 2, self.status | STATUS_CAPABILITIES)
        self._caps.append(_Capability(offset, cap_id, len(body), on_write, on_read))
        self._cap_free = end
        return offset

    def capabilities(self) -> list[tuple[int, int]]:
        """(offset, cap_id) for each capability, in list order."""
        return [(c.offset, c.cap_id) for c in self._caps]
