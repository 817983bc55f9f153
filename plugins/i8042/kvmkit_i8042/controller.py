"""An i8042-compatible PS/2 controller as a pure state machine.

Two ports: data (0x60) and status/command (0x64); the device registers each
as its own 1-byte range and hands the accesses to :meth:`I8042.read_data`,
:meth:`I8042.write_data`, :meth:`I8042.read_status` and
:meth:`I8042.write_command`.  There is a keyboard behind it; the aux (mouse)
port exists but has nothing plugged in, so the guest's mouse driver finds no
device instead of waiting for one.  A CPU reset through the controller calls
the injected ``reset`` callback.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, NamedTuple

from kvmkit.plugin_api import IrqLine

from .keyboard import QUEUE_SIZE as KBD_QUEUE_SIZE
from .keyboard import Keyboard

# status register
STR_OBF = 0x01
STR_IBF = 0x02          # never set: every write is taken at once
STR_SYS = 0x04
STR_CMD = 0x08          # the last write went to the command port
STR_KEYLOCK = 0x10      # set: the keyboard is not locked
STR_AUXDATA = 0x20
STR_TIMEOUT = 0x40

# command byte (controller RAM byte 0)
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_XLATE     # what PC firmware leaves behind

# commands
READ_RAM = 0x20          # 0x20-0x3F; 0x20 reads the command byte
WRITE_RAM = 0x60         # 0x60-0x7F; 0x60 writes the command byte
AUX_DISABLE = 0xA7
AUX_ENABLE = 0xA8
AUX_TEST = 0xA9
SELF_TEST = 0xAA
KBD_TEST = 0xAB
KBD_DISABLE = 0xAD
KBD_ENABLE = 0xAE
READ_OUTPUT_PORT = 0xD0
WRITE_OUTPUT_PORT = 0xD1
WRITE_KBD_BUFFER = 0xD2
WRITE_AUX_BUFFER = 0xD3
WRITE_AUX = 0xD4
PULSE = 0xF0             # 0xF0-0xFF: low bits 0 pulse those output lines; line 0 is reset

SELF_TEST_OK = 0x55
INTERFACE_OK = 0x00
NO_DEVICE = 0xFE         # with STR_TIMEOUT: nothing answered on the aux port
OUTPUT_PORT_DEFAULT = 0x03   # bit 0: reset not asserted; bit 1: A20 enabled
OUTPUT_PORT_RESET = 0x01
CONTROLLER_QUEUE = 16

WITH_PARAMETER = (WRITE_OUTPUT_PORT, WRITE_KBD_BUFFER, WRITE_AUX_BUFFER, WRITE_AUX)


class Out(NamedTuple):
    """A byte for the output buffer and where it seems to come from."""
    value: int
    aux: bool = False
    timeout: bool = False


class I8042:
    """Not thread-safe: the caller serialises access."""

    def __init__(self, kbd_irq: IrqLine, aux_irq: IrqLine, reset: Callable[[], None]):
        self._kbd_irq = kbd_irq
        self._aux_irq = aux_irq
        self._reset = reset
        self.keyboard = Keyboard()
        self.ram = bytearray(32)
        self.ram[0] = CTR_DEFAULT
        self.output_port = OUTPUT_PORT_DEFAULT
        self.reset_requested = False
        self._out: Out | None = None               # the output buffer
        self._replies: deque[Out] = deque()        # controller bytes waiting for the buffer
        self._awaiting: int | None = None          # a command waiting for its data byte
        self._last_read = 0
        self._cmd_flag = 0
        self._levels = [False, False]              # keyboard, aux

    @property
    def ctr(self) -> int:
        return self.ram[0]

    # -- ports ---------------------------------------------------------------------------
    def read_status(self) -> int:
        status = STR_KEYLOCK | self._cmd_flag | (self.ctr & CTR_SYS)
        if self._out is not None:
            status |= STR_OBF
            status |= STR_AUXDATA if self._out.aux else 0
            status |= STR_TIMEOUT if self._out.timeout else 0
        return status

    def read_data(self) -> int:
        if self._out is None:
            return self._last_read                 # an empty buffer reads its last byte
        self._last_read, self._out = self._out.value, None
        self._update_irqs()                        # the line drops ...
        self._fill()                               # ... and rises again for the next byte
        return self._last_read

    def write_data(self, value: int) -> None:
        self._cmd_flag = 0
        if self._awaiting is not None:
            cmd, self._awaiting = self._awaiting, None
            self._command_data(cmd, value)
        else:
            self.keyboard.command(value, translated=bool(self.ctr & CTR_XLATE))
        self._fill()

    def write_command(self, cmd: int) -> None:
        self._cmd_flag = STR_CMD
        self._awaiting = None
        if READ_RAM <= cmd < READ_RAM + 0x20:
            self._reply(self.ram[cmd - READ_RAM])
        elif WRITE_RAM <= cmd < WRITE_RAM + 0x20 or cmd in WITH_PARAMETER:
            self._awaiting = cmd
        elif cmd == AUX_DISABLE:
            self.ram[0] |= CTR_AUXDIS
        elif cmd == AUX_ENABLE:
            self.ram[0] &= ~CTR_AUXDIS
        elif cmd in (AUX_TEST, KBD_TEST):
            self._reply(INTERFACE_OK)
        elif cmd == SELF_TEST:
            self.ram[0] |= CTR_SYS
            self._reply(SELF_TEST_OK)
        elif cmd == KBD_DISABLE:
            self.ram[0] |= CTR_KBDDIS
        elif cmd == KBD_ENABLE:
            self.ram[0] &= ~CTR_KBDDIS
        elif cmd == READ_OUTPUT_PORT:
            self._reply(self.output_port)
        elif cmd >= PULSE and not cmd & OUTPUT_PORT_RESET:
            self._request_reset()
        self._fill()

    # -- snapshots -----------------------------------------------------------------------
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        """Controller RAM, output port, output buffer and queued replies, the
        keyboard's queue and settings, the interrupt levels."""
        kbd = self.keyboard
        out = None if self._out is None else list(self._out)
        return {"version": self.STATE_VERSION, "ram": bytes(self.ram).hex(),
                "output_port": self.output_port, "reset_requested": self.reset_requested,
                "out": out, "replies": [list(r) for r in self._replies],
                "awaiting": self._awaiting, "last_read": self._last_read,
                "cmd_flag": self._cmd_flag, "levels": list(self._levels),
                "keyboard": {"queue": list(kbd.queue), "scanning": kbd.scanning,
                             "leds": kbd.leds, "scancode_set": kbd.scancode_set,
                             "typematic": kbd.typematic, "awaiting": kbd._awaiting,
                             "last": kbd._last}}

    def restore_state(self, state: dict) -> None:
        """Put a :meth:`snapshot_state` back and drive both lines to their saved levels."""
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"i8042 state version {state.get('version')!r}; this plugin reads "
                             f"version {self.STATE_VERSION}")
        ram = bytes.fromhex(state["ram"])
        if len(ram) != len(self.ram):
            raise ValueError(f"i8042 state has {len(ram)} RAM bytes, not {len(self.ram)}")
        self.ram[:] = ram
        self.output_port = state["output_port"] & 0xFF
        self.reset_requested = bool(state["reset_requested"])
        out = state["out"]
        self._out = None if out is None else Out(out[0] & 0xFF, bool(out[1]), bool(out[2]))
        self._replies = deque(Out(v & 0xFF, bool(a), bool(t))
                              for v, a, t in state["replies"][:CONTROLLER_QUEUE])
        self._awaiting = state["awaiting"]
        self._last_read = state["last_read"] & 0xFF
        self._cmd_flag = state["cmd_flag"] & STR_CMD
        k, kbd = state["keyboard"], self.keyboard
        kbd.queue = deque(b & 0xFF for b in k["queue"][:KBD_QUEUE_SIZE])
        kbd.scanning, kbd.leds = bool(k["scanning"]), k["leds"] & 0x07
        kbd.scancode_set, kbd.typematic = k["scancode_set"], k["typematic"] & 0x7F
        kbd._awaiting, kbd._last = k["awaiting"], k["last"] & 0xFF
        for i, (line, level) in enumerate(((self._kbd_irq, bool(state["levels"][0])),
                                           (self._aux_irq, bool(state["levels"][1])))):
            self._levels[i] = level
            if level:
                line.set_level(True)
        self._update_irqs()

    # -- host side -----------------------------------------------------------------------
    def send_key(self, scancodes: bytes) -> bool:
        """Deliver the bytes of a key event from the keyboard (in the scan code
        set the guest reads: set 1 while the controller translates, which is
        the default).  False if the keyboard is disabled or full."""
        accepted = self.keyboard.send_key(scancodes)
        if accepted:
            self._fill()
        return accepted

    # -- internals -----------------------------------------------------------------------
    def _command_data(self, cmd: int, value: int) -> None:
        if WRITE_RAM <= cmd < WRITE_RAM + 0x20:
            self.ram[cmd - WRITE_RAM] = value
            self._update_irqs()                    # the interrupt enables may have changed
        elif cmd == WRITE_OUTPUT_PORT:
            self.output_port = value
            if not value & OUTPUT_PORT_RESET:
                self._request_reset()
        elif cmd == WRITE_KBD_BUFFER:
            self._reply(value)
        elif cmd == WRITE_AUX_BUFFER:
            self._reply(value, aux=True)
        elif cmd == WRITE_AUX:
            self._reply(NO_DEVICE, aux=True, timeout=True)

    def _request_reset(self) -> None:
        if not self.reset_requested:
            self.reset_requested = True
            self._reset()

    def _reply(self, value: int, aux: bool = False, timeout: bool = False) -> None:
        if len(self._replies) < CONTROLLER_QUEUE:
            self._replies.append(Out(value, aux, timeout))

    def _fill(self) -> None:
        if self._out is None:
            if self._replies:
                self._out = self._replies.popleft()
            elif not self.ctr & CTR_KBDDIS:
                byte = self.keyboard.pop()
                if byte is not None:
                    self._out = Out(byte)
        self._update_irqs()

    def _update_irqs(self) -> None:
        out, ctr = self._out, self.ctr
        kbd = out is not None and not out.aux and bool(ctr & CTR_KBDINT)
        aux = out is not None and out.aux and bool(ctr & CTR_AUXINT)
        for i, (line, level) in enumerate(((self._kbd_irq, kbd), (self._aux_irq, aux))):
            if level != self._levels[i]:
                self._levels[i] = level
                line.set_level(level)
