"""Pause and resume a running guest 200 times; after each resume it must make progress.

The guest is a few bytes of 64-bit code that loops on ``out 0x10, al``
(see bench/pio_exit.py): no kernel, no kit, a second or so of CPU in all.
A device thread takes the device lock in a loop, as a timer or a queue
worker does.  While paused neither the guest nor the device thread moves;
after resume both do, every time.

The race this catches (test_control.py::test_resume_continues flaked under
load): pause's kick left ``immediate_exit`` set on a vCPU that had not parked
yet (pause gave up waiting for it after 5 s on a loaded host and said
"paused" anyway); once resume came, every KVM_RUN returned EINTR at once and
the guest never ran again.  The rounds with a bare kick reproduce that
interleaving deterministically.
"""
from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from kvmkit.boot import pagetables
from kvmkit.device_context import DeviceContext
from kvmkit.hypervisor import cpu_setup
from kvmkit.hypervisor.kvm import Kvm
from kvmkit.machine import IDENTITY_MAP_ADDR, TSS_ADDR, Machine
from kvmkit.memory import GuestMemory
from kvmkit.plugin_api import PIO
from kvmkit.vcpu import VcpuThread

pytestmark = pytest.mark.kvm

CODE_AT = 0x100000
ROUNDS = 200
LOOP = (b"\xe6\x10"          # loop: out 0x10, al
        b"\xeb\xfc")         #       jmp loop


class Counter:
    def __init__(self):
        self.outs = 0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.outs += 1


@pytest.fixture
def spinning_machine():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        if os.environ.get("KVMKIT_REQUIRE_KVM") == "1":
            pytest.fail("/dev/kvm is not usable here (KVMKIT_REQUIRE_KVM=1 makes this a failure)")
        pytest.skip("/dev/kvm is not usable here")
    m = Machine(SimpleNamespace(name="pause-stress", vcpus=1, memory=16 << 20), pm=object())
    m.kvm = Kvm()
    m.vm = m.kvm.create_vm()
    m.memory = GuestMemory(16 << 20)
    m.vm.map_memory(m.memory)
    m.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
    m.vm.set_tss_addr(TSS_ADDR)
    m.vm.create_irqchip()
    gdt_base, gdt_limit = pagetables.write_gdt(m.memory)
    cr3 = pagetables.write_identity_map(m.memory)
    m.memory.write(CODE_AT, LOOP)
    boot = SimpleNamespace(entry=CODE_AT, boot_params=0, cr3=cr3, gdt_base=gdt_base,
                           gdt_limit=gdt_limit)
    vcpu = m.vm.create_vcpu(0)
    cpu_setup.setup_vcpu(vcpu, m.kvm.supported_cpuid(), 1, boot)
    m.vcpus.append(vcpu)
    ctx = DeviceContext(m, "counter.0")
    counter = Counter()
    ctx.add_io(PIO, 0x10, 1, counter)
    m.devices.append((ctx, counter))
    ticks = [0]

    def device_thread():                      # a timer thread: takes the device lock
        while not m.stopping.is_set():
            with ctx.lock:
                ticks[0] += 1
            time.sleep(0.0005)

    ctx.spawn("ticker", device_thread)
    old_handler = signal.signal(signal.SIGUSR1, lambda *_: None)   # as Machine.run does
    m.threads = [VcpuThread(vcpu, m)]
    m.threads[0].start()
    try:
        yield m, counter, ticks
    finally:
        m.request_stop("test over", 0)
        for t in m.threads:
            t.join(5)
        m.close()
        signal.signal(signal.SIGUSR1, old_handler)


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_pause_and_resume_200_times_with_progress_after_each(spinning_machine):
    m, counter, ticks = spinning_machine
    assert wait_until(lambda: counter.outs > 0, 60), "the guest never ran"
    t0 = time.monotonic()
    for i in range(ROUNDS):
        m.pause()
        outs, tick = counter.outs, ticks[0]
        time.sleep(0.002 if i % 10 else 0.05)
        assert (counter.outs, ticks[0]) == (outs, tick), f"round {i}: moved while paused"
        m.resume()
        assert wait_until(lambda: counter.outs > outs, 20), \
            f"round {i}: no guest progress after resume ({m.exit_counts()})"
        assert wait_until(lambda: ticks[0] > tick, 20), f"round {i}: the device thread stayed paused"
        if i % 3 == 0:                         # resume racing the vCPU as it parks
            m.pause()
            m.resume()
        if i % 5 == 0:
            # A pause whose resume came before the vCPU looked (or one that gave
            # up and let the VM run on): the kick is all the vCPU ever sees.
            outs = counter.outs
            m.threads[0].kick()
            assert wait_until(lambda: counter.outs > outs, 20), \
                f"round {i}: a kick without a pause stopped the guest for good"
    assert m.stop is None and not m.stopping.is_set()
    print(f"{ROUNDS} pause/resume rounds in {time.monotonic() - t0:.1f} s, "
          f"{counter.outs} guest port writes")
