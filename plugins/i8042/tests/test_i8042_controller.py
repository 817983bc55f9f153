"""Register-level tests of the i8042 controller and its keyboard."""
import pytest

from kvmkit.testing import FakeIrqLine
from kvmkit_i8042 import controller as c
from kvmkit_i8042 import keyboard as k
from kvmkit_i8042.controller import I8042


class Rig:
    def __init__(self):
        self.kbd_irq = FakeIrqLine(1)
        self.aux_irq = FakeIrqLine(12)
        self.resets = 0
        self.ctl = I8042(self.kbd_irq, self.aux_irq, self._reset)

    def _reset(self):
        self.resets += 1

    def command(self, cmd, param=None, results=0):
        """What Linux's i8042_command() does: command, optional data, read results."""
        assert not self.ctl.read_status() & c.STR_IBF
        self.ctl.write_command(cmd)
        if param is not None:
            self.ctl.write_data(param)
        return [self.read() for _ in range(results)]

    def read(self):
        assert self.ctl.read_status() & c.STR_OBF, "output buffer empty"
        return self.ctl.read_data()

    def drain(self):
        out = []
        while self.ctl.read_status() & c.STR_OBF:
            out.append(self.ctl.read_data())
        return out

    def kbd(self, byte):
        self.ctl.write_data(byte)
        return self.drain()


@pytest.fixture
def rig():
    return Rig()


def test_power_on_state(rig):
    assert rig.ctl.read_status() == c.STR_KEYLOCK | c.STR_SYS
    assert rig.ctl.ctr == c.CTR_KBDINT | c.CTR_SYS | c.CTR_XLATE
    assert rig.ctl.read_data() == 0
    assert rig.kbd_irq.history == [] and rig.aux_irq.history == []


def test_self_test(rig):
    assert rig.command(c.SELF_TEST, results=1) == [0x55]
    assert not rig.ctl.read_status() & c.STR_OBF


@pytest.mark.parametrize("cmd", [c.KBD_TEST, c.AUX_TEST])
def test_interface_tests_pass(rig, cmd):
    assert rig.command(cmd, results=1) == [0x00]


def test_cmd_flag_tracks_the_last_port_written(rig):
    rig.ctl.write_command(c.KBD_ENABLE)
    assert rig.ctl.read_status() & c.STR_CMD
    rig.ctl.write_data(k.ECHO)
    assert not rig.ctl.read_status() & c.STR_CMD


def test_command_byte_read_and_write(rig):
    assert rig.command(c.READ_RAM, results=1) == [0x45]
    rig.command(c.WRITE_RAM, 0x30)
    assert rig.command(c.READ_RAM, results=1) == [0x30]
    assert not rig.ctl.read_status() & c.STR_SYS               # SYS follows the command byte
    rig.command(c.WRITE_RAM, 0x34)
    assert rig.ctl.read_status() & c.STR_SYS


def test_controller_ram(rig):
    rig.command(c.WRITE_RAM + 5, 0xAB)
    assert rig.command(c.READ_RAM + 5, results=1) == [0xAB]
    assert rig.command(c.READ_RAM, results=1) == [0x45]


def test_disable_and_enable_ports(rig):
    rig.command(c.KBD_DISABLE)
    rig.command(c.AUX_DISABLE)
    assert rig.ctl.ctr & (c.CTR_KBDDIS | c.CTR_AUXDIS) == c.CTR_KBDDIS | c.CTR_AUXDIS
    rig.command(c.AUX_ENABLE)
    assert rig.ctl.ctr & (c.CTR_KBDDIS | c.CTR_AUXDIS) == c.CTR_KBDDIS
    rig.command(c.KBD_ENABLE)
    assert rig.ctl.ctr & (c.CTR_KBDDIS | c.CTR_AUXDIS) == 0


def test_replies_raise_irq1_when_enabled(rig):
    rig.ctl.write_command(c.SELF_TEST)
    assert rig.kbd_irq.level is True
    rig.ctl.read_data()
    assert rig.kbd_irq.level is False
    rig.command(c.WRITE_RAM, c.CTR_SYS | c.CTR_XLATE)            # interrupts off
    rig.ctl.write_command(c.SELF_TEST)
    assert rig.kbd_irq.level is False
    rig.command(c.WRITE_RAM, c.CTR_SYS | c.CTR_XLATE | c.CTR_KBDINT)
    assert rig.kbd_irq.level is True                             # the byte was still waiting
    assert rig.drain() == [0x55]
    assert rig.aux_irq.history == []


def test_keyboard_reset_acks_then_passes_bat_with_an_edge_each(rig):
    assert rig.kbd(k.RESET) == [k.ACK, k.BAT_OK]
    assert rig.kbd_irq.history == [True, False, True, False]


@pytest.mark.parametrize("byte", [k.ENABLE, k.DISABLE, k.SET_DEFAULTS, 0xF7, 0xFD])
def test_keyboard_commands_are_acked(rig, byte):
    assert rig.kbd(byte) == [k.ACK]


def test_keyboard_commands_with_a_parameter(rig):
    assert rig.kbd(k.SET_LEDS) == [k.ACK]
    assert rig.kbd(0x07) == [k.ACK]
    assert rig.ctl.keyboard.leds == 7
    assert rig.kbd(k.SET_TYPEMATIC) == [k.ACK]
    assert rig.kbd(0x20) == [k.ACK]
    assert rig.ctl.keyboard.typematic == 0x20
    assert rig.kbd(k.SCANCODE_SET) == [k.ACK]
    assert rig.kbd(0x00) == [k.ACK, 2]
    assert rig.kbd(k.SCANCODE_SET) == [k.ACK]
    assert rig.kbd(0x01) == [k.ACK]
    assert rig.ctl.keyboard.scancode_set == 1


def test_a_command_instead_of_a_parameter_starts_over(rig):
    rig.kbd(k.SET_LEDS)
    assert rig.kbd(k.ECHO) == [k.ECHO]
    assert rig.ctl.keyboard.leds == 0


def test_identify(rig):
    assert rig.kbd(k.IDENTIFY) == [k.ACK, 0xAB, 0x41]            # translated by default
    rig.command(c.WRITE_RAM, c.CTR_KBDINT | c.CTR_SYS)
    assert rig.kbd(k.IDENTIFY) == [k.ACK, 0xAB, 0x83]


def test_echo_resend_and_unknown(rig):
    assert rig.kbd(k.ECHO) == [k.ECHO]
    assert rig.kbd(k.RESEND_CMD) == [k.ECHO]
    assert rig.kbd(0x01) == [k.RESEND]


def test_send_key_delivers_one_byte_per_interrupt(rig):
    assert rig.ctl.send_key(b"\x1d\x38\xe0\x53")                # Ctrl, Alt, Delete (set 1)
    assert rig.kbd_irq.level is True
    assert rig.drain() == [0x1D, 0x38, 0xE0, 0x53]
    assert rig.kbd_irq.rising_edges == 4


def test_keys_wait_while_the_keyboard_port_is_disabled(rig):
    rig.command(c.KBD_DISABLE)
    assert rig.ctl.send_key(b"\x1e\x9e")
    assert not rig.ctl.read_status() & c.STR_OBF
    assert rig.command(c.SELF_TEST, results=1) == [0x55]        # the controller still answers
    rig.command(c.KBD_ENABLE)
    assert rig.drain() == [0x1E, 0x9E]


def test_keys_are_refused_when_not_scanning_or_full(rig):
    rig.kbd(k.DISABLE)
    assert not rig.ctl.send_key(b"\x1e")
    rig.kbd(k.ENABLE)
    rig.command(c.KBD_DISABLE)
    assert rig.ctl.send_key(bytes(16))
    assert not rig.ctl.send_key(b"\x1e")
    assert len(rig.ctl.keyboard.queue) == 16


def test_controller_replies_are_bounded(rig):
    for _ in range(100):
        rig.ctl.write_command(c.SELF_TEST)
    assert len(rig.drain()) == 1 + c.CONTROLLER_QUEUE


def test_new_command_cancels_a_pending_parameter(rig):
    rig.ctl.write_command(c.WRITE_RAM)
    rig.ctl.write_command(c.KBD_ENABLE)
    rig.ctl.write_data(k.ECHO)                                  # goes to the keyboard
    assert rig.drain() == [k.ECHO]
    assert rig.ctl.ctr == 0x45


def test_write_keyboard_output_buffer(rig):
    rig.command(c.WRITE_KBD_BUFFER, 0x42)
    assert rig.ctl.read_status() & (c.STR_OBF | c.STR_AUXDATA) == c.STR_OBF
    assert rig.kbd_irq.level is True
    assert rig.drain() == [0x42]


def test_aux_loopback_sets_auxdata_and_irq12(rig):
    rig.command(c.WRITE_AUX_BUFFER, 0x5A)
    assert rig.ctl.read_status() & c.STR_AUXDATA
    assert rig.aux_irq.level is False                          # AUXINT is off
    assert rig.drain() == [0x5A]
    rig.command(c.WRITE_RAM, c.CTR_DEFAULT | c.CTR_AUXINT)
    rig.command(c.WRITE_AUX_BUFFER, 0xA5)
    assert rig.aux_irq.level is True and rig.kbd_irq.level is False
    assert rig.drain() == [0xA5]
    assert rig.aux_irq.level is False


def test_writing_to_the_empty_aux_port_times_out(rig):
    rig.command(c.WRITE_AUX, 0xF2)
    status = rig.ctl.read_status()
    assert status & (c.STR_OBF | c.STR_AUXDATA | c.STR_TIMEOUT) == \
        c.STR_OBF | c.STR_AUXDATA | c.STR_TIMEOUT
    assert rig.drain() == [c.NO_DEVICE]
    assert not rig.ctl.read_status() & c.STR_TIMEOUT


def test_pulse_fe_resets_once(rig):
    for _ in range(10):                                        # Linux's reboot=k loop
        rig.ctl.write_command(0xFE)
    assert rig.resets == 1 and rig.ctl.reset_requested


@pytest.mark.parametrize("cmd,resets", [(0xF0, 1), (0xFE, 1), (0xFF, 0), (0xFD, 0), (0xFC, 1)])
def test_pulse_output_lines(rig, cmd, resets):
    rig.ctl.write_command(cmd)
    assert rig.resets == resets


def test_output_port(rig):
    assert rig.command(c.READ_OUTPUT_PORT, results=1) == [0x03]
    rig.command(c.WRITE_OUTPUT_PORT, 0x01)                      # A20 off: no reset
    assert rig.resets == 0
    assert rig.command(c.READ_OUTPUT_PORT, results=1) == [0x01]
    rig.command(c.WRITE_OUTPUT_PORT, 0x02)                      # bit 0 low: reset
    assert rig.resets == 1


def test_linux_style_probe(rig):
    """The order of operations of Linux's i8042 and atkbd drivers at boot."""
    assert rig.drain() == []                                   # i8042_flush
    assert rig.command(c.SELF_TEST, results=1) == [0x55]
    ctr = rig.command(c.READ_RAM, results=1)[0]
    assert rig.command(c.READ_RAM, results=1)[0] == ctr        # read until stable
    ctr = (ctr | c.CTR_KBDDIS) & ~(c.CTR_KBDINT | c.CTR_AUXINT)
    rig.command(c.WRITE_RAM, ctr)
    # i8042_check_mux: three loopback bytes, the third echoed back means "no mux"
    for value in (0xF0, 0x56, 0xA4):
        rig.ctl.write_command(c.WRITE_AUX_BUFFER)
        rig.ctl.write_data(value)
        assert rig.ctl.read_status() & c.STR_AUXDATA
        assert rig.ctl.read_data() == value
    # i8042_check_aux: loopback, toggle the port, interrupt delivery test
    rig.command(c.AUX_DISABLE)
    assert rig.command(c.READ_RAM, results=1)[0] & c.CTR_AUXDIS
    rig.command(c.AUX_ENABLE)
    assert not rig.command(c.READ_RAM, results=1)[0] & c.CTR_AUXDIS
    rig.command(c.WRITE_RAM, (ctr | c.CTR_AUXINT) & ~c.CTR_AUXDIS)
    rig.ctl.write_command(c.WRITE_AUX_BUFFER)
    rig.ctl.write_data(0xA5)
    assert rig.aux_irq.level is True                           # "AUX IRQ delivered"
    assert rig.ctl.read_data() == 0xA5
    # psmouse probes the aux port: the empty port reports a timeout at once
    rig.command(c.WRITE_AUX, 0xF2)
    assert rig.ctl.read_status() & c.STR_TIMEOUT and rig.ctl.read_data() == c.NO_DEVICE
    # i8042_enable_kbd_port, then atkbd: GETID, SETLEDS, SETREP, ENABLE
    ctr = (ctr | c.CTR_KBDINT) & ~c.CTR_KBDDIS
    rig.command(c.WRITE_RAM, ctr)
    assert rig.kbd(k.IDENTIFY) == [k.ACK, 0xAB, 0x41]
    assert rig.kbd(k.SET_LEDS) + rig.kbd(0) == [k.ACK, k.ACK]
    assert rig.kbd(k.SET_TYPEMATIC) + rig.kbd(0) == [k.ACK, k.ACK]
    assert rig.kbd(k.ENABLE) == [k.ACK]
    assert rig.ctl.send_key(b"\x1e")
    assert rig.drain() == [0x1E]
    assert rig.resets == 0
