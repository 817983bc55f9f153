"""Register-level tests of the 16550A state machine (no VM, no threads)."""
import pytest

from kvmkit.testing import FakeIrqLine
from kvmkit_serial8250 import uart as u
from kvmkit_serial8250.uart import Uart16550


class Rig:
    def __init__(self):
        self.irq = FakeIrqLine(4)
        self.out = bytearray()
        self.drained = 0
        self.uart = Uart16550(self.irq, self.out.extend, self._drained)

    def _drained(self):
        self.drained += 1

    def r(self, reg):
        return self.uart.read(reg, 1)

    def w(self, reg, value):
        self.uart.write(reg, 1, value)

    def read_all(self):
        data = bytearray()
        while self.r(u.LSR) & u.LSR_DR:
            data.append(self.r(u.RBR))
        return bytes(data)


@pytest.fixture
def rig():
    return Rig()


@pytest.fixture
def live(rig):
    """Interrupts wired to the bus (OUT2), as Linux sets it up."""
    rig.w(u.MCR, u.MCR_OUT2 | u.MCR_DTR | u.MCR_RTS)
    return rig


def test_reset_state(rig):
    assert rig.r(u.IER) == 0
    assert rig.r(u.IIR) == 0x01
    assert rig.r(u.LCR) == 0
    assert rig.r(u.MCR) == 0
    assert rig.r(u.LSR) == u.LSR_THRE | u.LSR_TEMT
    assert rig.r(u.MSR) == u.MSR_CTS | u.MSR_DSR | u.MSR_DCD
    assert rig.irq.level is False and rig.irq.history == []


def test_thr_write_transmits(rig):
    for b in b"hi\n":
        rig.w(u.THR, b)
    assert bytes(rig.out) == b"hi\n"
    assert rig.r(u.LSR) & (u.LSR_THRE | u.LSR_TEMT) == u.LSR_THRE | u.LSR_TEMT
    assert rig.uart.transmitted == 3


def test_dlab_switches_offsets_0_and_1_to_the_divisor(rig):
    rig.w(u.IER, 0x05)
    rig.w(u.LCR, u.LCR_DLAB | 0x03)
    rig.w(u.DLL, 0x01)
    rig.w(u.DLM, 0x02)
    assert rig.r(u.DLL) == 0x01 and rig.r(u.DLM) == 0x02
    assert rig.uart.divisor == 0x0201
    assert rig.out == b""                       # the DLL write did not transmit
    rig.w(u.LCR, 0x03)
    assert rig.r(u.IER) == 0x05                 # IER untouched by the DLM write
    assert rig.r(u.LCR) == 0x03
    rig.w(u.THR, ord("x"))
    assert rig.out == b"x"


def test_wide_access_is_split_into_bytes(rig):
    rig.w(u.LCR, u.LCR_DLAB)
    rig.uart.write(0, 2, 0x0180)
    assert rig.uart.divisor == 0x0180
    assert rig.uart.read(0, 2) == 0x0180


def test_ier_keeps_only_four_bits(rig):
    rig.w(u.IER, 0xFF)
    assert rig.r(u.IER) == 0x0F


def test_scratch_register(rig):
    rig.w(u.SCR, 0xA5)
    assert rig.r(u.SCR) == 0xA5


def test_irq_needs_out2(rig):
    rig.w(u.IER, u.IER_THRI)
    assert rig.r(u.IIR) & 0x0F == u.IIR_THRI    # pending inside the UART ...
    assert rig.irq.level is False               # ... but OUT2 gates it off the bus
    rig.w(u.IER, 0)
    rig.w(u.IER, u.IER_THRI)
    rig.w(u.MCR, u.MCR_OUT2)
    assert rig.irq.level is True


def test_thre_interrupt_on_enabling_etbei(live):
    live.w(u.IER, u.IER_THRI)
    assert live.irq.level is True
    assert live.r(u.IIR) == u.IIR_THRI
    # reading IIR with THRE as the source acknowledges it
    assert live.irq.level is False
    assert live.r(u.IIR) == u.IIR_NO_INT


def test_thre_rearms_after_each_thr_write(live):
    live.w(u.IER, u.IER_THRI)
    live.r(u.IIR)
    assert live.irq.level is False
    live.w(u.THR, ord("a"))
    assert live.irq.level is True
    assert live.r(u.IIR) == u.IIR_THRI
    assert live.irq.history == [True, False, True, False]


def test_rewriting_ier_does_not_retrigger_thre(live):
    live.w(u.IER, u.IER_THRI)
    live.r(u.IIR)
    live.w(u.IER, u.IER_THRI | u.IER_RDI)
    assert live.r(u.IIR) == u.IIR_NO_INT


def test_disabling_etbei_drops_thre(live):
    live.w(u.IER, u.IER_THRI)
    live.w(u.IER, 0)
    assert live.irq.level is False
    assert live.r(u.IIR) == u.IIR_NO_INT


def test_rx_without_fifo_holds_one_byte_and_keeps_the_rest_pending(rig):
    rig.uart.feed(b"abc")
    assert rig.uart.rx_count == 1 and rig.uart.pending_input == 2
    assert rig.r(u.LSR) & u.LSR_DR
    assert rig.read_all() == b"abc"
    assert not rig.r(u.LSR) & u.LSR_DR
    assert rig.uart.pending_input == 0
    assert rig.r(u.LSR) & u.LSR_OE == 0         # back-pressure, never an overrun


def test_rbr_read_when_empty(rig):
    assert rig.r(u.RBR) == 0
    assert rig.r(u.LSR) == u.LSR_THRE | u.LSR_TEMT


def test_fifo_holds_sixteen_and_nothing_is_lost(rig):
    rig.w(u.FCR, u.FCR_ENABLE)
    data = bytes(range(40, 80))
    rig.uart.feed(data)
    assert rig.uart.rx_count == 16
    assert rig.uart.pending_input == len(data) - 16
    assert rig.read_all() == data
    assert rig.drained == 1


def test_iir_fifo_bits(rig):
    assert rig.r(u.IIR) == 0x01
    rig.w(u.FCR, u.FCR_ENABLE)
    assert rig.r(u.IIR) == 0xC1
    rig.w(u.FCR, 0)
    assert rig.r(u.IIR) == 0x01


@pytest.mark.parametrize("fcr,level", [(0x01, 1), (0x41, 4), (0x81, 8), (0xC1, 14)])
def test_trigger_levels(live, fcr, level):
    live.w(u.FCR, fcr)
    live.w(u.IER, u.IER_RDI)
    if level > 1:
        live.uart.feed(b"x" * (level - 1))
        assert live.r(u.IIR) & 0x0F == u.IIR_RX_TIMEOUT   # data below the trigger still interrupts
        live.uart.feed(b"x")
    else:
        live.uart.feed(b"x")
    assert live.r(u.IIR) & 0x0F == u.IIR_RDI
    assert live.irq.level is True


def test_rx_interrupt_ends_when_the_data_is_read(live):
    live.w(u.FCR, 0xC1)
    live.w(u.IER, u.IER_RDI)
    live.uart.feed(b"hello")
    assert live.irq.level is True
    assert live.read_all() == b"hello"
    assert live.irq.level is False
    assert live.r(u.IIR) == 0xC1


def test_fcr_clear_rx_empties_fifo_then_pending_refills(rig):
    rig.w(u.FCR, u.FCR_ENABLE)
    rig.uart.feed(bytes(20))
    rig.w(u.FCR, u.FCR_ENABLE | u.FCR_CLEAR_RX)
    assert rig.uart.rx_count == 4 and rig.uart.pending_input == 0


def test_changing_fifo_mode_clears_the_receiver(rig):
    rig.w(u.FCR, u.FCR_ENABLE)
    rig.uart.feed(b"0123")
    rig.w(u.FCR, 0)
    assert rig.uart.rx_count == 0
    assert not rig.uart.fifo_enabled


def test_loopback_sends_thr_to_the_receiver(rig):
    rig.w(u.MCR, u.MCR_LOOP)
    rig.w(u.THR, 0x55)
    assert rig.out == b""
    assert rig.r(u.LSR) & u.LSR_DR
    assert rig.r(u.RBR) == 0x55


def test_loopback_holds_host_input_back_until_it_ends(rig):
    rig.w(u.MCR, u.MCR_LOOP)
    rig.uart.feed(b"host")
    assert rig.uart.rx_count == 0 and rig.uart.pending_input == 4
    rig.w(u.MCR, 0)
    assert rig.read_all() == b"host"


def test_loopback_modem_lines(rig):
    rig.r(u.MSR)
    rig.w(u.MCR, u.MCR_LOOP | u.MCR_DTR | u.MCR_RTS | u.MCR_OUT1 | u.MCR_OUT2)
    assert rig.r(u.MSR) & 0xF0 == 0xF0
    rig.w(u.MCR, u.MCR_LOOP | u.MCR_OUT2 | u.MCR_RTS)      # Linux's probe: MCR 0x1A, MSR 0x90
    assert rig.r(u.MSR) & 0xF0 == 0x90


def test_msr_deltas_and_trailing_edge_of_ring(rig):
    rig.w(u.MCR, u.MCR_LOOP)                     # CTS, DSR, DCD drop
    assert rig.r(u.MSR) == u.MSR_DCTS | u.MSR_DDSR | u.MSR_DDCD
    assert rig.r(u.MSR) == 0                      # deltas clear on read
    rig.w(u.MCR, u.MCR_LOOP | u.MCR_OUT1)        # RI rises: no TERI yet
    assert rig.r(u.MSR) == u.MSR_RI
    rig.w(u.MCR, u.MCR_LOOP)                     # RI falls
    assert rig.r(u.MSR) == u.MSR_TERI


def test_modem_status_interrupt(live):
    live.w(u.IER, u.IER_MSI)
    assert live.irq.level is False
    live.w(u.MCR, u.MCR_LOOP | u.MCR_OUT2)       # CTS and DSR drop
    assert live.irq.level is True
    assert live.r(u.IIR) == u.IIR_MSI
    live.r(u.MSR)
    assert live.irq.level is False
    assert live.r(u.IIR) == u.IIR_NO_INT


def test_overrun_without_fifo_replaces_rbr(rig):
    rig.w(u.MCR, u.MCR_LOOP)
    rig.w(u.THR, 1)
    rig.w(u.THR, 2)
    lsr = rig.r(u.LSR)
    assert lsr & u.LSR_OE and lsr & u.LSR_DR
    assert rig.r(u.LSR) & u.LSR_OE == 0          # cleared by reading LSR
    assert rig.r(u.RBR) == 2


def test_overrun_with_fifo_loses_the_new_byte(rig):
    rig.w(u.FCR, u.FCR_ENABLE)
    rig.w(u.MCR, u.MCR_LOOP)
    for b in range(17):
        rig.w(u.THR, b)
    assert rig.r(u.LSR) & u.LSR_OE
    assert rig.read_all() == bytes(range(16))


def test_iir_priorities(live):
    live.w(u.MCR, u.MCR_LOOP | u.MCR_OUT2)
    live.r(u.MSR)
    live.w(u.IER, 0x0F)
    live.w(u.MCR, u.MCR_LOOP | u.MCR_OUT2 | u.MCR_RTS)   # CTS rises: modem status pending
    live.w(u.THR, 1)
    live.w(u.THR, 2)                                     # overrun: line status pending
    assert live.r(u.IIR) == u.IIR_RLSI
    live.r(u.LSR)
    assert live.r(u.IIR) == u.IIR_RDI
    live.r(u.RBR)
    assert live.r(u.IIR) == u.IIR_THRI                   # acknowledged by this read
    assert live.r(u.IIR) == u.IIR_MSI
    live.r(u.MSR)
    assert live.r(u.IIR) == u.IIR_NO_INT
    assert live.irq.level is False


def test_line_status_interrupt_needs_elsi(live):
    live.w(u.MCR, u.MCR_LOOP | u.MCR_OUT2)
    live.w(u.THR, 1)
    live.w(u.THR, 2)
    assert live.r(u.IIR) == u.IIR_NO_INT
    live.w(u.IER, u.IER_RLSI)
    assert live.irq.level is True


def test_level_changes_only_when_the_state_does(live):
    live.w(u.IER, u.IER_RDI)
    live.uart.feed(b"a")
    live.uart.feed(b"b")                          # already high: no second set_level
    live.r(u.RBR)
    live.r(u.RBR)
    assert live.irq.history == [True, False]


def test_reading_rbr_refills_from_pending_without_dropping_the_line(live):
    live.w(u.IER, u.IER_RDI)
    live.uart.feed(b"xy")
    live.r(u.RBR)                                 # 'y' moves in at once: still pending
    assert live.irq.level is True
    live.r(u.RBR)
    assert live.irq.level is False
    assert live.irq.rising_edges == 1


def test_drained_callback_fires_when_pending_empties(rig):
    rig.uart.feed(b"a")                          # straight into RBR: pending never held it
    assert rig.drained == 0
    rig.uart.feed(b"b")
    assert rig.drained == 0
    rig.r(u.RBR)
    assert rig.drained == 1
