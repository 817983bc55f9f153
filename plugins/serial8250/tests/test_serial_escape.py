"""The Ctrl-A console escapes."""
from kvmkit_serial8250.escape import HELP, QUIT, EscapeFilter


def test_plain_bytes_pass_through():
    assert EscapeFilter().process(b"ls -l\r") == (b"ls -l\r", [])


def test_ctrl_a_x_quits_and_drops_what_follows():
    assert EscapeFilter().process(b"ab\x01xcd") == (b"ab", [QUIT])


def test_double_ctrl_a_sends_one():
    assert EscapeFilter().process(b"\x01\x01z") == (b"\x01z", [])


def test_help():
    assert EscapeFilter().process(b"\x01h") == (b"", [HELP])


def test_escape_may_straddle_reads():
    f = EscapeFilter()
    assert f.process(b"q\x01") == (b"q", [])
    assert f.process(b"x") == (b"", [QUIT])


def test_unknown_escape_is_swallowed():
    f = EscapeFilter()
    assert f.process(b"\x01za") == (b"a", [])
    assert f.process(b"x") == (b"x", [])          # the escape is over
