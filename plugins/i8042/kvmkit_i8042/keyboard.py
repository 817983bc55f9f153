"""A PS/2 keyboard as the controller sees it: commands in, bytes queued out."""
from __future__ import annotations

from collections import deque

ACK = 0xFA
RESEND = 0xFE
BAT_OK = 0xAA
ECHO = 0xEE
ID = (0xAB, 0x83)
ID_TRANSLATED = (0xAB, 0x41)     # what the guest sees through the controller's translation
QUEUE_SIZE = 16                  # a keyboard's own buffer

SET_LEDS = 0xED
SCANCODE_SET = 0xF0
IDENTIFY = 0xF2
SET_TYPEMATIC = 0xF3
ENABLE = 0xF4
DISABLE = 0xF5
SET_DEFAULTS = 0xF6
RESEND_CMD = 0xFE
RESET = 0xFF
WITH_PARAMETER = (SET_LEDS, SCANCODE_SET, SET_TYPEMATIC)
FIRST_COMMAND = SET_LEDS         # 0xED-0xFF are commands, anything lower a parameter


class Keyboard:
    def __init__(self) -> None:
        self.queue: deque[int] = deque()
        self.scanning = True
        self.leds = 0
        self.scancode_set = 2
        self.typematic = 0x2B
        self._awaiting: int | None = None     # a command waiting for its parameter
        self._last = ACK                       # for RESEND

    def command(self, byte: int, translated: bool) -> None:
        """A byte the guest wrote to the keyboard (port 0x60)."""
        if self._awaiting is not None and byte < FIRST_COMMAND:
            cmd, self._awaiting = self._awaiting, None
            self._parameter(cmd, byte)
            return
        self._awaiting = None
        if byte == RESET:
            self.queue.clear()
            self._defaults()
            self.scanning = True
            self._reply(ACK, BAT_OK)
        elif byte == RESEND_CMD:
            self._reply(self._last)
        elif byte == ECHO:
            self._reply(ECHO)
        elif byte == IDENTIFY:
            self._reply(ACK, *(ID_TRANSLATED if translated else ID))
        elif byte in WITH_PARAMETER:
            self._awaiting = byte
            self._reply(ACK)
        elif byte == ENABLE:
            self.queue.clear()
            self.scanning = True
            self._reply(ACK)
        elif byte == DISABLE:
            self._defaults()
            self.scanning = False
            self._reply(ACK)
        elif byte == SET_DEFAULTS:
            self._defaults()
            self._reply(ACK)
        elif byte >= FIRST_COMMAND:           # 0xF7-0xFD: scan set 3 key modes
            self._reply(ACK)
        else:
            self._reply(RESEND)

    def _parameter(self, cmd: int, value: int) -> None:
        if cmd == SET_LEDS:
            self.leds = value & 0x07
            self._reply(ACK)
        elif cmd == SET_TYPEMATIC:
            self.typematic = value & 0x7F
            self._reply(ACK)
        elif value == 0:                       # SCANCODE_SET: which one is in use?
            self._reply(ACK, self.scancode_set)
        elif value <= 3:
            self.scancode_set = value
            self._reply(ACK)
        else:
            self._reply(RESEND)

    def send_key(self, data: bytes) -> bool:
        """Scancode bytes from a key event; False (and nothing queued) if the
        keyboard is not scanning or its buffer cannot take them all."""
        if not self.scanning or len(self.queue) + len(data) > QUEUE_SIZE:
            return False
        self.queue.extend(data)
        return True

    def pop(self) -> int | None:
        if not self.queue:
            return None
        self._last = self.queue.popleft()
        return self._last

    def _defaults(self) -> None:
        self.leds = 0
        self.typematic = 0x2B
        self.scancode_set = 2

    def _reply(self, *data: int) -> None:
        room = QUEUE_SIZE - len(self.queue)
        self.queue.extend(data[:room])
