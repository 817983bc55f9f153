"""kvmkit.testing as a pytest plugin: its fixtures, used the way a plugin
author's tests use them."""
import threading

import pytest

import kvmkit.testing
from kvmkit.bus import Bus, DeviceFault
from kvmkit.plugin_api import DeviceError, VirtioDevice, VirtqueueError
from kvmkit.testing import FakeContext, VirtioTestDriver, config, pio, plugin_manager


def test_the_core_installs_the_pytest_plugin(pytestconfig):
    assert pytestconfig.pluginmanager.get_plugin("kvmkit") is kvmkit.testing
    assert pytestconfig.getoption("kvmkit_contract") is None


def test_guest_memory(guest_memory):
    assert guest_memory.size == 4 << 20
    assert guest_memory.read(0x1000, 4) == bytes(4)
    guest_memory.write(0x2000, b"abc")
    assert guest_memory.read(0x2000, 3) == b"abc"


def test_irq_line(irq_line):
    irq_line.set_level(True)
    irq_line.set_level(False)
    irq_line.pulse()
    assert irq_line.history == [True, False, "pulse"] and irq_line.rising_edges == 2


def test_buses_are_the_cores(pio_bus, mmio_bus):
    assert isinstance(pio_bus, Bus) and pio_bus.space == "pio"
    assert isinstance(mmio_bus, Bus) and mmio_bus.space == "mmio"
    assert pio_bus.read(0x1234, 2) == 0xFFFF                # nobody claims it


class Latch:
    def __init__(self):
        self.value = 0

    def read(self, offset, size):
        if offset == 3:
            raise ValueError("offset 3 is broken")
        return self.value + offset

    def write(self, offset, size, value):
        self.value = value


def test_device_context_puts_ranges_on_the_buses(device_context, pio_bus, mmio_bus):
    latch = Latch()
    device_context.add_io("pio", 0x510, 4, latch)
    device_context.add_io("mmio", 0xFEB0_0000, 0x100, Latch())
    pio_bus.write(0x510, 1, 0x1FF)
    assert pio_bus.read(0x511, 1) == 0x00                    # masked to the access size, as a vCPU sees
    assert pio(device_context, 0x510) == 0x1FF               # the helper goes to the handler directly
    assert [r.owner for r in mmio_bus.ranges()] == ["test.0"]
    with pytest.raises(DeviceFault, match="device test.0 failed: ValueError: offset 3 is broken"):
        pio_bus.read(0x513, 1)


def test_device_context_overlap_with_the_bus(device_context, pio_bus):
    pio_bus.add(0x600, 8, Latch(), threading.RLock(), "other.0")
    with pytest.raises(Exception, match="overlaps other.0"):
        device_context.add_io("pio", 0x604, 4, Latch())
    with pytest.raises(DeviceError, match="overlaps"):
        device_context.add_io("pio", 0x700, 4, Latch())
        device_context.add_io("pio", 0x702, 4, Latch())


def test_device_context_shares_guest_memory(device_context, guest_memory):
    assert device_context.memory is guest_memory


def test_device_context_drives_a_real_plugin(device_context, pio_bus):
    rtc = pytest.importorskip("kvmkit_rtc.plugin")
    pm = plugin_manager(rtc.plugin)
    dev = pm.hook.kvmkit_create_device(kind="rtc", config=config(rtc.SPEC), ctx=device_context)
    pio_bus.write(0x70, 1, 0x20)                             # NVRAM byte 0x20
    pio_bus.write(0x71, 1, 0x5A)
    assert pio_bus.read(0x71, 1) == 0x5A
    dev.close()


def test_fake_context_close_reports_a_thread_that_does_not_stop():
    ctx = FakeContext(join_timeout=0.1)
    release = threading.Event()
    ctx.spawn("stuck", lambda: release.wait(5))
    with pytest.raises(RuntimeError, match="still running after stop: test.0:stuck"):
        ctx.close()
    release.set()


class Echo(VirtioDevice):
    """Copies each chain's readable bytes into its writable buffers, upper-cased."""
    device_id = 42
    queue_sizes = (8, 4)

    def process(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            data = chain.read(q.memory, 0, chain.readable_len).upper()[:chain.writable_len]
            chain.write(q.memory, 0, data)
            q.push(chain.head, len(data))

    def config_bytes(self):
        return b"\x01\x02\x03\x04"


def test_virtqueue_driver_plays_the_guest(virtqueue_driver):
    drv = virtqueue_driver(Echo())
    assert isinstance(drv, VirtioTestDriver)
    assert drv.request(0, readable=[b"hello ", b"world"], writable=[4, 16]) == (11, b"HELLO WORLD")
    assert drv.request(1, readable=[b"q1"], writable=[2]) == (2, b"Q1")
    assert drv.config(0, 4) == 0x04030201


def test_virtqueue_driver_several_chains_and_indirect(virtqueue_driver):
    drv = virtqueue_driver(Echo(), indirect=True, event_idx=True)
    reqs = [drv.submit(0, readable=[bytes([97 + i])], writable=[1], indirect=i % 2 == 0)
            for i in range(5)]
    assert drv.notify(0) == [(r.head, 1) for r in reqs]
    assert b"".join(drv.written(r) for r in reqs) == b"ABCDE"


def test_virtqueue_driver_negotiates_what_it_is_told(virtqueue_driver):
    dev = Echo()
    drv = virtqueue_driver(dev)
    assert drv.features == 1 << 32                           # VERSION_1 only
    assert dev.driver_features == drv.features and len(dev.queues) == 2
    with pytest.raises(ValueError, match="above the device's maximum 8"):
        virtqueue_driver(Echo(), queue_sizes=[16, 4])


def test_virtqueue_driver_hostile_head(virtqueue_driver):
    drv = virtqueue_driver(Echo())
    drv.queues[0].submit_head(9)
    with pytest.raises(VirtqueueError):
        drv.notify(0)


def test_virtqueue_driver_uses_the_given_lock(virtqueue_driver):
    lock = threading.RLock()
    seen = []

    class Locked(Echo):
        def process(self, index):
            seen.append(lock._is_owned())
            super().process(index)

    virtqueue_driver(Locked(), lock=lock).request(0, readable=[b"x"], writable=[1])
    assert seen == [True]


@pytest.mark.parametrize("module, never", [
    ("kvmkit.fakes", ("kvmkit.contract", "kvmkit.testing", "kvmkit.pytest_plugin")),
    ("kvmkit.contract", ("kvmkit.testing", "kvmkit.pytest_plugin")),
    ("kvmkit.pytest_plugin", ("kvmkit.testing",)),
])
def test_the_test_helpers_import_one_way(module, never):
    """pytest plugin -> contract -> fakes; kvmkit.testing is the facade above them."""
    import subprocess
    import sys
    code = (f"import sys, {module}; "
            f"print(' '.join(m for m in {list(never)!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"importing {module} imported {r.stdout.strip()}"


def test_no_helper_below_the_facade_imports_it_even_lazily():
    """The contract and the pytest plugin once imported kvmkit.testing inside
    functions (a circle: testing imports both); the fakes are their bottom now."""
    import re
    from pathlib import Path
    core = Path(kvmkit.testing.__file__).parent
    below = [core / "fakes.py", core / "pytest_plugin.py", *sorted((core / "contract").glob("*.py"))]
    pattern = re.compile(r"^\s*(from\s+(\.+testing|kvmkit\.testing)\s+import|import\s+kvmkit\.testing)",
                         re.M)
    offenders = [p.name for p in below if pattern.search(p.read_text())]
    assert offenders == []
