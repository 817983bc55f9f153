"""i8042 state for snapshots: saved with bytes waiting and a command half
done, restored into a fresh controller, both answer the same."""
import json

from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import FakeContext, config, pio, plugin_manager
from kvmkit_i8042.plugin import SPEC, plugin


def create(ctx):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="i8042", config=config(SPEC), ctx=ctx)


def read_all(ctx):
    out = []
    for _ in range(40):
        status = pio(ctx, 0x64)
        out.append(status)
        if not status & 1:
            return out
        out.append(pio(ctx, 0x60))
    return out


def test_saved_mid_exchange_restores_buffers_settings_and_irq():
    with FakeContext() as a, FakeContext() as b:
        dev_a = create(a)
        pio(a, 0x64, value=0x60)                   # write CTR ...
        pio(a, 0x60, value=0x47)                   # ... keyboard interrupt on, translate, SYS
        pio(a, 0x60, value=0xED)                   # keyboard: set LEDs, parameter pending
        dev_a.send_key(b"\x1e\x9e")                # 'a' pressed and released, behind the ACK
        pio(a, 0x64, value=0xD2)                   # write keyboard buffer: data byte pending
        state = save_device(a, dev_a)
        assert json.loads(json.dumps(state)) == state
        dev_b = create(b)
        restore_device(b, dev_b, state)
        assert b.irqs[1].level is True and a.irqs[1].level is True
        for ctx in (a, b):
            pio(ctx, 0x60, value=0x55)             # the D2 data byte
        assert read_all(b) == read_all(a)
        for ctx in (a, b):
            pio(ctx, 0x60, value=0x02)             # the LEDs parameter
        assert read_all(b) == read_all(a)
        assert dev_b.controller.keyboard.leds == 0x02
        assert save_device(b, dev_b) == save_device(a, dev_a)
