"""The DeviceContext a real VM hands its devices (kvmkit.device_context)."""
import threading
import types

from kvmkit.device_context import DeviceContext
from kvmkit.machine import Machine
from kvmkit.plugin_api import EXIT_ERROR


def machine():
    return Machine(types.SimpleNamespace(name="vm"), pm=object())


def test_a_device_thread_that_dies_stops_the_vm_naming_the_device():
    """Before: the exception went to threading.excepthook and the VM ran on
    without the device's thread (a console that no longer reads, a timer that
    no longer ticks)."""
    m = machine()
    ctx = DeviceContext(m, "serial8250.0")
    hooked = []
    old, threading.excepthook = threading.excepthook, hooked.append
    try:
        t = ctx.spawn("input", lambda: 1 / 0)
        t.join(5)
    finally:
        threading.excepthook = old
    assert m.stopping.wait(5)
    assert m.stop.code == EXIT_ERROR
    assert m.stop.reason.startswith("device serial8250.0 failed: its input thread died: "
                                    "ZeroDivisionError")
    assert hooked == [] and ctx.threads == [t]


def test_a_device_thread_that_returns_stops_nothing():
    m = machine()
    ctx = DeviceContext(m, "rtc.0")
    ctx.spawn("timer", lambda: None).join(5)
    assert not m.stopping.is_set() and m.stop is None
