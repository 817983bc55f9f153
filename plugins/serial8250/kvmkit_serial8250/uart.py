"""A 16550A UART as a pure state machine.

Registers in (``read``/``write`` at offsets 0-7), bytes out (the ``output``
callback gets each transmitted byte), interrupts through an injected
:class:`~kvmkit.plugin_api.IrqLine` driven as a level.  Host input enters
with :meth:`Uart16550.feed`; what does not fit in the receiver waits in a
pending buffer that drains as the guest reads, so nothing is dropped.

Transmission is instantaneous: a byte written to THR leaves at once, so THR
and the transmitter are always empty (LSR THRE and TEMT stay set) and the
THRE interrupt re-arms right after every write.
"""
from __future__ import annotations

from collections import deque
from typing import Callable

from kvmkit.plugin_api import IrqLine

FIFO_SIZE = 16

# register offsets
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER
IER_RDI = 0x01          # received data available
IER_THRI = 0x02         # transmitter holding register empty
IER_RLSI = 0x04         # receiver line status
IER_MSI = 0x08          # modem status

# IIR
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_RX_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0

# FCR
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02          # (bit 2 clears the TX FIFO, which is always empty here)
TRIGGER_LEVELS = (1, 4, 8, 14)

# LCR
LCR_DLAB = 0x80

# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10

# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_PE = 0x04
LSR_FE = 0x08
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
LSR_ERRORS = LSR_OE | LSR_PE | LSR_FE | LSR_BI

# MSR
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTAS = 0x0F

HOST_LINES = MSR_CTS | MSR_DSR | MSR_DCD      # a connected terminal, no ring


class Uart16550:
    """One 16550A.  Not thread-safe: the caller serialises access."""

    def __init__(self, irq: IrqLine, output: Callable[[bytes], None],
                 on_input_drained: Callable[[], None] | None = None):
        self._irq = irq
        self._output = output
        self._on_input_drained = on_input_drained
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.scr = 0
        self.divisor = 12                 # 9600 baud until the guest sets it
        self.fifo_enabled = False
        self.trigger = 1
        self._rx: deque[int] = deque()
        self._pending = bytearray()       # host input the receiver has no room for yet
        self._errors = 0                  # sticky LSR error bits, cleared by reading LSR
        self._thre_pending = False
        self._lines = HOST_LINES          # MSR bits 4-7
        self._deltas = 0                  # MSR bits 0-3
        self._irq_level = False
        self.transmitted = 0              # bytes sent to the host (statistics)

    # -- bus interface -----------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            reg = offset + i
            byte = self._read_reg(reg) if reg < 8 else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            reg = offset + i
            if reg < 8:
                self._write_reg(reg, (value >> (8 * i)) & 0xFF)

    # -- host side ---------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Host input for the guest.  Nothing is dropped: bytes the receiver
        cannot take yet wait in the pending buffer."""
        if not data:
            return
        self._pending += data
        self._refill(notify=False)
        self._update_irq()

    @property
    def pending_input(self) -> int:
        """Host bytes waiting for room in the receiver."""
        return len(self._pending)

    @property
    def rx_count(self) -> int:
        return len(self._rx)

    @property
    def loopback(self) -> bool:
        return bool(self.mcr & MCR_LOOP)

    @property
    def irq_level(self) -> bool:
        return self._irq_level

    # -- snapshots ---------------------------------------------------------------------
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        """Registers, the receive FIFO, host input still waiting for room,
        the interrupt conditions and the line level (bytes as hex)."""
        return {"version": self.STATE_VERSION, "ier": self.ier, "lcr": self.lcr, "mcr": self.mcr,
                "scr": self.scr, "divisor": self.divisor, "fifo_enabled": self.fifo_enabled,
                "trigger": self.trigger, "rx": bytes(self._rx).hex(),
                "pending": bytes(self._pending).hex(), "errors": self._errors,
                "thre_pending": self._thre_pending, "lines": self._lines, "deltas": self._deltas,
                "irq_level": self._irq_level, "transmitted": self.transmitted}

    def restore_state(self, state: dict) -> None:
        """Put a :meth:`snapshot_state` back (on a UART that has not run) and
        drive the interrupt line to the saved level."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"16550 state version {state.get('version')!r}; this plugin reads "
                             f"version {self.STATE_VERSION}")
        self.ier = state["ier"] & 0x0F
        self.lcr = state["lcr"] & 0xFF
        self.mcr = state["mcr"] & 0x1F
        self.scr = state["scr"] & 0xFF
        self.divisor = state["divisor"] & 0xFFFF
        self.fifo_enabled = bool(state["fifo_enabled"])
        self.trigger = state["trigger"] if state["trigger"] in TRIGGER_LEVELS else 1
        self._rx = deque(bytes.fromhex(state["rx"])[:FIFO_SIZE])
        self._pending = bytearray.fromhex(state["pending"])
        self._errors = state["errors"] & 0xFF
        self._thre_pending = bool(state["thre_pending"])
        self._lines = state["lines"] & 0xF0
        self._deltas = state["deltas"] & 0x0F
        self.transmitted = int(state["transmitted"])
        self._irq_level = bool(state["irq_level"])
        if self._irq_level:
            self._irq.set_level(True)
        self._update_irq()

    # -- registers ---------------------------------------------------------------------
    def _read_reg(self, reg: int) -> int:
        dlab = self.lcr & LCR_DLAB
        if reg == RBR:
            return self.divisor & 0xFF if dlab else self._read_rbr()
        if reg == IER:
            return self.divisor >> 8 if dlab else self.ier
        if reg == IIR:
            return self._read_iir()
        if reg == LCR:
            return self.lcr
        if reg == MCR:
            return self.mcr
        if reg == LSR:
            return self._read_lsr()
        if reg == MSR:
            return self._read_msr()
        return self.scr

    def _write_reg(self, reg: int, value: int) -> None:
        dlab = self.lcr & LCR_DLAB
        if reg == THR:
            if dlab:
                self.divisor = (self.divisor & 0xFF00) | value
            else:
                self._write_thr(value)
        elif reg == IER:
            if dlab:
                self.divisor = (self.divisor & 0x00FF) | (value << 8)
            else:
                self._write_ier(value)
        elif reg == FCR:
            self._write_fcr(value)
        elif reg == LCR:
            self.lcr = value
        elif reg == MCR:
            self._write_mcr(value)
        elif reg == SCR:
            self.scr = value
        # LSR and MSR writes (factory test) are ignored

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0
        value = self._rx.popleft()
        self._refill()
        self._update_irq()
        return value

    def _write_thr(self, value: int) -> None:
        if self.loopback:
            self._receive(value)
        else:
            self.transmitted += 1
            self._output(bytes((value,)))
        # Writing THR clears a pending THRE interrupt; the byte leaves at once,
        # so THR is empty again and the interrupt re-arms.
        self._thre_pending = bool(self.ier & IER_THRI)
        self._update_irq()

    def _write_ier(self, value: int) -> None:
        value &= 0x0F
        enabling_thri = value & IER_THRI and not self.ier & IER_THRI
        self.ier = value
        if enabling_thri:
            self._thre_pending = True          # THR is always empty
        elif not value & IER_THRI:
            self._thre_pending = False
        self._update_irq()

    def _write_fcr(self, value: int) -> None:
        enable = bool(value & FCR_ENABLE)
        if enable != self.fifo_enabled:
            self._rx.clear()                   # changing the mode empties both FIFOs
            self.fifo_enabled = enable
        if enable:
            if value & FCR_CLEAR_RX:
                self._rx.clear()
            self.trigger = TRIGGER_LEVELS[value >> 6]
        self._refill()
        self._update_irq()

    def _write_mcr(self, value: int) -> None:
        was_loop = self.loopback
        self.mcr = value & 0x1F
        self._set_lines(self._modem_lines())
        if was_loop and not self.loopback:
            self._refill()
        self._update_irq()

    def _read_iir(self) -> int:
        ident = self._interrupt_id()
        if ident == IIR_THRI:
            self._thre_pending = False         # reading IIR acknowledges THRE
            self._update_irq()
        return ident | (IIR_FIFO_ENABLED if self.fifo_enabled else 0)

    def _read_lsr(self) -> int:
        value = LSR_THRE | LSR_TEMT | self._errors
        if self._rx:
            value |= LSR_DR
        if self._errors:
            self._errors = 0
            self._update_irq()
        return value

    def _read_msr(self) -> int:
        value = self._lines | self._deltas
        if self._deltas:
            self._deltas = 0
            self._update_irq()
        return value

    # -- internals ---------------------------------------------------------------------
    def _capacity(self) -> int:
        return FIFO_SIZE if self.fifo_enabled else 1

    def _receive(self, byte: int) -> None:
        """A byte arrives at the receiver with no one to hold it back (loopback)."""
        if len(self._rx) < self._capacity():
            self._rx.append(byte)
        elif self.fifo_enabled:
            self._errors |= LSR_OE             # the shift register is overwritten
        else:
            self._rx[-1] = byte                # RBR is overwritten
            self._errors |= LSR_OE

    def _refill(self, notify: bool = True) -> None:
        """Move pending host input into the receiver as far as it has room;
        tell the host side (``notify``) when the backlog is gone."""
        if not self._pending or self.loopback:
            return
        n = min(self._capacity() - len(self._rx), len(self._pending))
        if n <= 0:
            return
        self._rx.extend(self._pending[:n])
        del self._pending[:n]
        if notify and not self._pending and self._on_input_drained is not None:
            self._on_input_drained()

    def _modem_lines(self) -> int:
        if not self.loopback:
            return HOST_LINES
        m = self.mcr
        return ((MSR_CTS if m & MCR_RTS else 0) | (MSR_DSR if m & MCR_DTR else 0)
                | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))

    def _set_lines(self, lines: int) -> None:
        changed = lines ^ self._lines
        if changed & MSR_CTS:
            self._deltas |= MSR_DCTS
        if changed & MSR_DSR:
            self._deltas |= MSR_DDSR
        if changed & MSR_RI and not lines & MSR_RI:
            self._deltas |= MSR_TERI           # trailing edge of ring only
        if changed & MSR_DCD:
            self._deltas |= MSR_DDCD
        self._lines = lines

    def _interrupt_id(self) -> int:
        ier = self.ier
        if ier & IER_RLSI and self._errors:
            return IIR_RLSI
        if ier & IER_RDI and self._rx:
            if self.fifo_enabled and len(self._rx) < self.trigger:
                return IIR_RX_TIMEOUT          # below the trigger: report as a timeout
            return IIR_RDI
        if ier & IER_THRI and self._thre_pending:
            return IIR_THRI
        if ier & IER_MSI and self._deltas:
            return IIR_MSI
        return IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt output reaches the bus only through OUT2.
        level = self._interrupt_id() != IIR_NO_INT and bool(self.mcr & MCR_OUT2)
        if level != self._irq_level:
            self._irq_level = level
            self._irq.set_level(level)
