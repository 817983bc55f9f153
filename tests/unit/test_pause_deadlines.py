"""Machine.pause/resume and the graceful stop's device call have deadlines:
something that hangs gives an error naming it, and the VM runs on (no KVM)."""
import threading
import time
import types

import pytest

from kvmkit.machine import Machine, PauseError


class FakeVcpu:
    """A vCPU thread as pause() sees it; ``parks``: whether a kick parks it."""

    def __init__(self, name, parks=True):
        self.name = name
        self.parked = threading.Event()
        self.exits = {}
        self._parks = parks
        # what kvmkit status reads of a vCPU thread (endings.vcpu_status)
        self.vcpu = types.SimpleNamespace(index=0, run=None)
        self.watch = types.SimpleNamespace(last_reason=None, left_kvm=False)

    def kick(self):
        if self._parks:
            self.parked.set()

    def is_alive(self):
        return True


def machine(*vcpus, devices=("serial8250.0",)):
    m = Machine(types.SimpleNamespace(name="vm", vcpus=1, memory=16 << 20), pm=object())
    m.threads = list(vcpus)
    m.devices = [(types.SimpleNamespace(name=n, lock=threading.RLock(), pausables=()), object())
                 for n in devices]
    return m


def in_thread(fn, timeout):
    """Run ``fn`` with a deadline: (finished, exception)."""
    out = {}

    def run():
        try:
            fn()
        except Exception as e:
            out["e"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    return not t.is_alive(), out.get("e")


def test_pause_and_resume():
    m = machine(FakeVcpu("vcpu0"))
    lock = m.devices[0][0].lock
    m.pause(timeout=2)
    assert m.paused and not lock.acquire(blocking=False)    # the pause thread holds it
    m.resume(timeout=2)
    assert not m.paused and lock.acquire(timeout=2)
    lock.release()


def test_a_device_lock_that_is_never_released_fails_the_pause_naming_the_device():
    """Before: held.wait() had no deadline: pause blocked forever, and the
    control connection (and stop/resume after it) with it."""
    m = machine(FakeVcpu("vcpu0"), devices=("rtc.0", "serial8250.0"))
    stuck = m.devices[1][0].lock
    taken, release = threading.Event(), threading.Event()

    def hog():
        with stuck:
            taken.set()
            release.wait(30)
    threading.Thread(target=hog, daemon=True).start()
    taken.wait(5)
    try:
        t0 = time.monotonic()
        finished, error = in_thread(lambda: m.pause(timeout=0.5), timeout=10)
        assert finished, "pause blocked on a device lock"
        assert isinstance(error, PauseError) and "serial8250.0" in str(error)
        assert time.monotonic() - t0 < 5
        assert not m.paused                               # the VM keeps running
    finally:
        release.set()
    assert m._pauser.join(5) is None and not m._pauser.is_alive()
    m.pause(timeout=2)                                    # and the next pause works
    m.resume(timeout=2)


def test_a_vcpu_that_does_not_park_fails_the_pause_naming_it():
    """Before: pause waited 5 s per vCPU, then said "paused" with the vCPU running."""
    m = machine(FakeVcpu("vcpu0"), FakeVcpu("vcpu1", parks=False))
    with pytest.raises(PauseError, match="vcpu1 did not stop"):
        m.pause(timeout=0.3)
    assert not m.paused


def test_graceful_stop_does_not_wait_forever_for_a_busy_device(monkeypatch):
    import kvmkit.machine as machine_mod
    monkeypatch.setattr(machine_mod, "PAUSE_TIMEOUT", 0.3)
    m = machine()
    busy = types.SimpleNamespace(name="i8042.0", lock=threading.RLock())
    calls = []
    m.shutdown_handlers = [(busy, lambda: calls.append("i8042"))]
    taken, release = threading.Event(), threading.Event()

    def hog():
        with busy.lock:
            taken.set()
            release.wait(30)
    threading.Thread(target=hog, daemon=True).start()
    taken.wait(5)
    try:
        finished, error = in_thread(lambda: calls.append(m.request_guest_shutdown()), timeout=10)
    finally:
        release.set()
    assert finished and error is None and calls == [False]


def test_the_control_socket_answers_a_pause_that_hung_with_an_error(tmp_path, monkeypatch):
    from kvmkit import control
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    m = machine(FakeVcpu("vcpu0", parks=False))
    m.pause = lambda: Machine.pause(m, timeout=0.2)
    server = control.ControlServer(m, "vm")
    try:
        answer = control.request("vm", "pause", wait_s=10)
        assert answer["ok"] is False and "vcpu0 did not stop" in answer["error"]
        assert control.request("vm", "status", wait_s=10)["result"]["state"] == "running"
    finally:
        server.close()
