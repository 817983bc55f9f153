"""The runtime's side of a queue engine (kvmkit.virtio.runtime): which fds the
worker polls, MSI-X masks and ISR bits forwarded, pausing with the VM."""
import os
import types

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.virtio.device import VirtioDevice
from kvmkit.virtio.pci_transport import ISR, VirtioPciTransport
from kvmkit.virtio.runtime import VirtioPciRuntime


class Model(VirtioDevice):
    device_id = 99
    queue_sizes = (16, 16)


class Engine:
    def __init__(self):
        self.event_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.calls = []
        self.isr = 0

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")

    def set_masked(self, masked):
        self.calls.append(("masked", masked))

    def take_isr(self):
        value, self.isr = self.isr, 0
        return value

    def service(self):
        self.calls.append("service")


@pytest.fixture
def runtime():
    rt = VirtioPciRuntime.__new__(VirtioPciRuntime)      # the engine bookkeeping only
    rt.device = Model()
    rt.queue_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in rt.device.queue_sizes]
    rt.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
    rt.offloads, rt._generation, rt._paused = {}, 0, False
    rt.ctx = types.SimpleNamespace(name="model.0")
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    rt.transport = VirtioPciTransport(rt.device, mem, on_vector_change=rt._route,
                                      on_msix_control=rt._msix_control)
    rt.vectors = [types.SimpleNamespace(route=lambda a, d: None, fd=-1)
                  for _ in range(rt.transport.vectors)]
    yield rt
    for fd in (*rt.queue_fds, rt.wake_fd):
        os.close(fd)


def test_the_worker_polls_the_engine_instead_of_the_queue_kick(runtime):
    engine = Engine()
    before = set(runtime._handlers())
    runtime.offload(1, engine)
    after = runtime._handlers()
    assert before == set(runtime.queue_fds)
    assert set(after) == {runtime.queue_fds[0], engine.event_fd}
    after[engine.event_fd][1]()
    assert engine.calls[-1] == "service"
    assert os.eventfd_read(runtime.wake_fd) == 1              # the worker re-reads its fds
    runtime.release(1)
    assert set(runtime._handlers()) == set(runtime.queue_fds)
    assert os.eventfd_read(runtime.queue_fds[1]) == 1         # left-over chains: the worker's now
    os.close(engine.event_fd)


def test_isr_read_takes_the_engines_bits(runtime):
    engine = Engine()
    runtime.offload(0, engine)
    engine.isr = 1
    assert runtime.transport.read(ISR, 1) == 1
    assert runtime.transport.read(ISR, 1) == 0
    runtime.release(0)
    engine.isr = 1
    assert runtime.transport.read(ISR, 1) == 0                # no longer a source
    os.close(engine.event_fd)


def test_msix_mask_state_follows_the_queue_vector(runtime):
    t = runtime.transport
    t.queues[0].vector = 1
    engine = Engine()
    t.msix.set_control(True, False)
    runtime.offload(0, engine)
    assert engine.calls[-1] == ("masked", True)               # table entries start masked
    t.msix.write(1 * 16 + 12, 4, 0)                           # unmask vector 1
    assert engine.calls[-1] == ("masked", False)
    t.msix.set_control(True, True)                            # function mask
    assert engine.calls[-1] == ("masked", True)
    os.close(engine.event_fd)


def test_pause_reaches_engines_including_one_offloaded_while_paused(runtime):
    first, second = Engine(), Engine()
    runtime.offload(0, first)
    runtime.pause()
    runtime.offload(1, second)
    assert first.calls[-1] == "pause" and second.calls[-1] == "pause"
    runtime.release(1)                                        # released while paused: running again
    assert second.calls[-1] == "resume"
    runtime.resume()
    assert first.calls[-1] == "resume"
    for e in (first, second):
        os.close(e.event_fd)


def test_machine_pause_pauses_what_never_takes_a_device_lock():
    import threading
    from kvmkit.machine import Machine
    calls = []
    runtime = types.SimpleNamespace(pause=lambda: calls.append("pause"),
                                    resume=lambda: calls.append("resume"))
    ctx = types.SimpleNamespace(lock=threading.RLock(), pausables=[runtime])
    m = Machine.__new__(Machine)                         # only what pausing uses
    m.devices, m.running = [(ctx, object())], threading.Event()
    held = threading.Event()
    pauser = threading.Thread(target=m._hold_devices, args=(held,))
    pauser.start()
    assert held.wait(5)
    assert calls == ["pause"]
    assert not ctx.lock.acquire(blocking=False)          # the device lock is held too
    m.running.set()                                      # resume
    pauser.join(5)
    assert calls == ["pause", "resume"]
    assert ctx.lock.acquire(blocking=False)
    ctx.lock.release()
