"""serial8250 state for snapshots: saved mid-operation, restored into a fresh
port, both behave the same."""
import json

import pytest

from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_serial8250 import uart as u
from kvmkit_serial8250.plugin import SPEC, plugin

COM1 = 0x3F8


def create(ctx, tmp_path, name="out"):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(
        kind="serial8250", config=config(SPEC, backend="file", path=tmp_path / name), ctx=ctx)


def registers(ctx):
    """Every register the guest can read without side effects, DLAB off and on."""
    lcr = pio(ctx, COM1 + u.LCR)
    out = [pio(ctx, COM1 + r) for r in (u.IER, u.LCR, u.MCR, u.SCR)]
    pio(ctx, COM1 + u.LCR, value=lcr | u.LCR_DLAB)
    out += [pio(ctx, COM1 + u.THR), pio(ctx, COM1 + u.IER)]
    pio(ctx, COM1 + u.LCR, value=lcr)
    return out


def drain(ctx):
    """What the guest reads: IIR, LSR, MSR and the data, until the FIFO is empty."""
    seen = []
    for _ in range(40):
        iir, lsr, msr = (pio(ctx, COM1 + r) for r in (u.IIR, u.LSR, u.MSR))
        seen.append((iir, lsr, msr))
        if not lsr & u.LSR_DR:
            break
        seen.append(pio(ctx, COM1 + u.RBR))
    return seen


def test_saved_mid_input_restores_registers_fifo_backlog_and_irq(tmp_path):
    with FakeContext() as a, FakeContext() as b:
        dev_a = create(a, tmp_path, "a")
        pio(a, COM1 + u.LCR, value=u.LCR_DLAB | 0x03)
        pio(a, COM1 + u.THR, value=0x01)                      # divisor 1: 115200 baud
        pio(a, COM1 + u.LCR, value=0x03)
        pio(a, COM1 + u.FCR, value=0xC7)                      # FIFO on, trigger 14
        pio(a, COM1 + u.MCR, value=0x0B)                      # DTR RTS OUT2
        pio(a, COM1 + u.IER, value=0x07)                      # RX, THRE, line status
        pio(a, COM1 + u.SCR, value=0x5A)
        dev_a.feed(bytes(range(0x41, 0x41 + 30)))              # 16 in the FIFO, 14 waiting
        pio(a, COM1 + u.RBR)                                   # the guest took one
        state = save_device(a, dev_a)
        assert json.loads(json.dumps(state)) == state and state["version"] == 1
        dev_b = create(b, tmp_path, "b")
        restore_device(b, dev_b, state)
        assert b.irqs[4].level is True and a.irqs[4].level is True
        assert registers(b) == registers(a)
        assert drain(b) == drain(a)                            # the same bytes, the same IIR/LSR
        assert save_device(b, dev_b) == save_device(a, dev_a)


def test_restored_port_transmits_to_its_own_backend(tmp_path):
    with FakeContext() as a, FakeContext() as b:
        dev_a = create(a, tmp_path, "a")
        dev_a.start()
        pio(a, COM1 + u.THR, value=ord("x"))
        dev_b = create(b, tmp_path, "b")
        restore_device(b, dev_b, save_device(a, dev_a))
        dev_b.start()
        pio(b, COM1 + u.THR, value=ord("y"))
        dev_a.close(), dev_b.close()
        assert (tmp_path / "a").read_bytes() == b"x"
        assert (tmp_path / "b").read_bytes() == b"y"
        assert dev_b.uart.transmitted == 2


def test_state_of_another_version_is_refused(tmp_path):
    with FakeContext() as a:
        dev = create(a, tmp_path)
        state = save_device(a, dev)
        state["device"]["version"] = 99
        with pytest.raises(Exception, match="version 99"):
            restore_device(a, dev, state)
