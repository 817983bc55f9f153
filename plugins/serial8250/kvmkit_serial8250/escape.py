"""The Ctrl-A escape of the interactive console (a pure filter).

Ctrl-A x quits, Ctrl-A h shows help, Ctrl-A Ctrl-A sends one Ctrl-A to the
guest; Ctrl-A followed by anything else is swallowed.
"""
from __future__ import annotations

CTRL_A = 0x01
QUIT = "quit"
HELP = "help"

HELP_TEXT = (b"\r\nkvmkit console escapes:\r\n"
             b"  Ctrl-A x       quit\r\n"
             b"  Ctrl-A Ctrl-A  send Ctrl-A to the guest\r\n"
             b"  Ctrl-A h       this help\r\n")


class EscapeFilter:
    """Split terminal input into bytes for the guest and console commands.
    Keeps state across calls, so an escape may straddle two reads."""

    def __init__(self) -> None:
        self._armed = False

    def process(self, data: bytes) -> tuple[bytes, list[str]]:
        out = bytearray()
        actions: list[str] = []
        for byte in data:
            if self._armed:
                self._armed = False
                if byte == CTRL_A:
                    out.append(CTRL_A)
                elif byte in b"xX":
                    actions.append(QUIT)
                    break                      # nothing typed after quitting matters
                elif byte in b"hH?":
                    actions.append(HELP)
            elif byte == CTRL_A:
                self._armed = True
            else:
                out.append(byte)
        return bytes(out), actions
