"""MSI-X: the capability in config space, the vector table and the pending-bit array.

Table entry (16 bytes): message address low (bits 1:0 read as 0), message
address high, message data, vector control (bit 0: masked; other bits read
as 0).  Every entry starts masked.  The pending-bit array (PBA) holds one bit
per vector in little-endian qwords and is read-only.

A vector fires by :meth:`MsixTable.fire`.  When MSI-X is enabled and neither
the vector nor the whole function is masked, the message is returned for the
caller to deliver; when it is masked the vector's pending bit is set instead,
and the message goes out (pending bit cleared) as soon as the vector becomes
deliverable again, through ``on_deliver(vector, address, data)``.  With MSI-X
disabled nothing is sent or remembered: the function uses INTx.

Callbacks (optional attributes, also constructor keywords):

* ``on_vector_change(vector)`` after a table write changed a vector's
  address, data or mask bit;
* ``on_control_change(enabled, function_masked)`` after the capability's
  message control changed either bit;
* ``on_deliver(vector, address, data)`` for a pending message that became
  deliverable (after ``on_vector_change``/``on_control_change``).  While it
  is unset, pending bits stay set; :meth:`MsixTable.take_deliverable` collects
  them instead.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

from .config_space import ConfigSpace

PCI_CAP_ID_MSIX = 0x11

MSIX_ENTRY_SIZE = 16
MSIX_MAX_VECTORS = 2048
MSIX_CONTROL_TABLE_SIZE = 0x07FF          # N - 1
MSIX_CONTROL_FUNCTION_MASK = 1 << 14
MSIX_CONTROL_ENABLE = 1 << 15
MSIX_BIR_MASK = 0x7
MSIX_BODY_SIZE = 10                       # message control, table offset/BIR, PBA offset/BIR
MSIX_VECTOR_MASKED = 1

# Offsets inside a table entry.
ENTRY_ADDRESS_LOW = 0
ENTRY_ADDRESS_HIGH = 4
ENTRY_DATA = 8
ENTRY_VECTOR_CONTROL = 12

_ENTRY_WRITE_MASK = bytes([0xFC, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
                           0xFF, 0xFF, 0xFF, 0xFF, MSIX_VECTOR_MASKED, 0, 0, 0])
_ENTRY_RESET = bytes(12) + bytes([MSIX_VECTOR_MASKED, 0, 0, 0])


class MsixVector(NamedTuple):
    address: int
    data: int
    masked: bool          # the vector's own mask bit (the function mask is separate)


class MsixPba:
    """MMIO handler for the pending-bit array; guest writes are ignored."""

    def __init__(self, table: MsixTable):
        self._table = table
        self.size = ((table.vectors + 63) // 64) * 8

    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return 0
        return (self._table._pending >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        pass


class MsixTable:
    """MMIO handler for the vector table (``size`` bytes); ``pba`` handles the PBA."""

    def __init__(self, vectors: int, *,
                 on_vector_change: Callable[[int], None] | None = None,
                 on_control_change: Callable[[bool, bool], None] | None = None,
                 on_deliver: Callable[[int, int, int], None] | None = None):
        if not 1 <= vectors <= MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X vector count {vectors} is not in 1-{MSIX_MAX_VECTORS}")
        self.vectors = vectors
        self.size = vectors * MSIX_ENTRY_SIZE
        self._entries = bytearray(_ENTRY_RESET * vectors)
        self._pending = 0
        self._enabled = False
        self._function_masked = False
        self.on_vector_change = on_vector_change
        self.on_control_change = on_control_change
        self.on_deliver = on_deliver
        self.pba = MsixPba(self)

    # -- state ------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def function_masked(self) -> bool:
        return self._function_masked

    def vector(self, i: int) -> MsixVector:
        self._check(i)
        e = i * MSIX_ENTRY_SIZE
        entry = self._entries
        address = int.from_bytes(entry[e:e + 8], "little")
        data = int.from_bytes(entry[e + ENTRY_DATA:e + ENTRY_DATA + 4], "little")
        return MsixVector(address, data, bool(entry[e + ENTRY_VECTOR_CONTROL] & MSIX_VECTOR_MASKED))

    def pending(self, i: int) -> bool:
        self._check(i)
        return bool(self._pending >> i & 1)

    def _check(self, i: int) -> None:
        if not 0 <= i < self.vectors:
            raise IndexError(f"MSI-X vector {i} is not in 0-{self.vectors - 1}")

    def _deliverable(self, i: int) -> bool:
        return (self._enabled and not self._function_masked
                and not self._entries[i * MSIX_ENTRY_SIZE + ENTRY_VECTOR_CONTROL] & MSIX_VECTOR_MASKED)

    # -- the device side --------------------------------------------------------------------
    def fire(self, i: int) -> tuple[int, int] | None:
        """Raise vector ``i``: the (address, data) to send now, or None when the
        vector is masked (its pending bit is set) or MSI-X is disabled."""
        self._check(i)
        if not self._enabled:
            return None
        if not self._deliverable(i):
            self._pending |= 1 << i
            return None
        v = self.vector(i)
        return v.address, v.data

    def take_deliverable(self) -> list[tuple[int, int, int]]:
        """Clear the pending bits of vectors that may now be sent and return
        them as (vector, address, data)."""
        out = []
        pending = self._pending
        while pending:
            i = (pending & -pending).bit_length() - 1
            pending &= pending - 1
            if self._deliverable(i):
                self._pending &= ~(1 << i)
                v = self.vector(i)
                out.append((i, v.address, v.data))
        return out

    def _flush(self) -> None:
        if self.on_deliver is not None and self._pending:
            for vector, address, data in self.take_deliverable():
                self.on_deliver(vector, address, data)

    def set_control(self, enabled: bool, function_masked: bool) -> None:
        """The message-control bits changed (MsixCapability calls this)."""
        enabled, function_masked = bool(enabled), bool(function_masked)
        if (enabled, function_masked) == (self._enabled, self._function_masked):
            return
        self._enabled, self._function_masked = enabled, function_masked
        if self.on_control_change is not None:
            self.on_control_change(enabled, function_masked)
        self._flush()

    # -- snapshots ---------------------------------------------------------------------------
    def save_state(self) -> dict:
        """The table and the pending bits (the enable and function-mask bits
        live in the capability, in config space)."""
        return {"entries": self._entries.hex(), "pending": self._pending}

    def restore_state(self, state: dict) -> None:
        """Put the table back: ``on_vector_change`` runs for every vector
        whose entry differs from the reset state (so its route is set
        again); the pending bits come back without a delivery (that happens
        when the capability's control is restored and the vector is
        deliverable)."""
        entries = bytes.fromhex(state["entries"])
        if len(entries) != self.size:
            raise ValueError(f"MSI-X state holds {len(entries)} table bytes, the table has {self.size}")
        self._entries[:] = entries
        self._pending = int(state["pending"]) & ((1 << self.vectors) - 1)
        if self.on_vector_change is not None:
            for i in range(self.vectors):
                if entries[i * MSIX_ENTRY_SIZE:(i + 1) * MSIX_ENTRY_SIZE] != _ENTRY_RESET:
                    self.on_vector_change(i)

    # -- guest accesses to the table ---------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > self.size:
            return 0
        return int.from_bytes(self._entries[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset < 0 or offset + size > self.size:
            return
        first, last = offset // MSIX_ENTRY_SIZE, (offset + size - 1) // MSIX_ENTRY_SIZE
        before = [self.vector(i) for i in range(first, last + 1)]
        entries = self._entries
        for k in range(size):
            a = offset + k
            m = _ENTRY_WRITE_MASK[a % MSIX_ENTRY_SIZE]
            entries[a] = (entries[a] & ~m) | ((value >> (8 * k)) & m)
        for i, old in zip(range(first, last + 1), before):
            if self.vector(i) != old and self.on_vector_change is not None:
                self.on_vector_change(i)
        self._flush()


class MsixCapability:
    """The MSI-X capability of a function whose table and PBA live in its BARs.

    ``install(config)`` links the capability into ``config`` and keeps
    ``table.enabled``/``table.function_masked`` in step with the guest's
    writes to message control (bit 15 enable, bit 14 function mask; the
    table size field is read-only).
    """

    def __init__(self, table: MsixTable, table_bar: int, table_offset: int,
                 pba_bar: int, pba_offset: int):
        for name, bir, offset in (("table", table_bar, table_offset), ("PBA", pba_bar, pba_offset)):
            if not 0 <= bir <= 5:
                raise ValueError(f"MSI-X {name} BAR {bir} is not 0-5")
            if offset < 0 or offset & MSIX_BIR_MASK or offset >= 1 << 32:
                raise ValueError(f"MSI-X {name} offset {offset:#x} is not a qword-aligned 32-bit offset")
        if table_bar == pba_bar and (table_offset < pba_offset + table.pba.size
                                     and pba_offset < table_offset + table.size):
            raise ValueError("the MSI-X table and PBA overlap")
        self.table = table
        self.table_bar, self.table_offset = table_bar, table_offset
        self.pba_bar, self.pba_offset = pba_bar, pba_offset
        self.offset: int | None = None
        self._config: ConfigSpace | None = None

    def body(self) -> bytes:
        control = self.table.vectors - 1
        return (control.to_bytes(2, "little")
                + (self.table_offset | self.table_bar).to_bytes(4, "little")
                + (self.pba_offset | self.pba_bar).to_bytes(4, "little"))

    @staticmethod
    def writable() -> bytes:
        high = (MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK) >> 8
        return bytes([0x00, high]) + bytes(MSIX_BODY_SIZE - 2)

    def install(self, config: ConfigSpace) -> int:
        """Add the capability to ``config``; returns its offset."""
        if self._config is not None:
            raise ValueError("this MSI-X capability is already installed")
        for name, bir, offset, size in (("table", self.table_bar, self.table_offset, self.table.size),
                                        ("PBA", self.pba_bar, self.pba_offset, self.table.pba.size)):
            bar = config.bar(bir)
            if not bar.is_memory or offset + size > bar.size:
                raise ValueError(f"MSI-X {name} ({size:#x} bytes at {offset:#x}) does not fit "
                                 f"in {bar.kind} BAR {bir} of {bar.size:#x} bytes")
        self.offset = config.add_capability(PCI_CAP_ID_MSIX, self.body(), self.writable(),
                                            on_write=self._written)
        self._config = config
        return self.offset

    @property
    def control(self) -> int:
        """The message control register as the guest sees it."""
        if self._config is None:
            raise ValueError("the MSI-X capability is not installed")
        return self._config.read(self.offset + 2, 2)

    def _written(self, offset_in_body: int, size: int, value: int) -> None:
        if offset_in_body < 2:
            control = self.control
            self.table.set_control(bool(control & MSIX_CONTROL_ENABLE),
                                   bool(control & MSIX_CONTROL_FUNCTION_MASK))
