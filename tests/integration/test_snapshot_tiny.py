"""Snapshots of a hand-made guest (no kernel, no devices): a guest counting
in a register and in memory, writing each count to a port, is snapshotted
while it runs; two machines restored from the snapshot each go on from the
saved count: their first write is the next count."""
import os
import threading
import time

import pytest

import tiny
from kvmkit import snapshot, snapshot_format
from kvmkit.hypervisor._kvm import lib
from kvmkit.hypervisor.kvm import Kvm
from kvmkit.machine import Machine, MachineError

pytestmark = pytest.mark.kvm

PORT = 0x510
COUNTER = 0x200000
COUNT = bytes([
    0x48, 0xFF, 0xC3,                                  # loop: inc rbx
    0x48, 0x89, 0x1C, 0x25, 0x00, 0x00, 0x20, 0x00,    # mov [0x200000], rbx
    0x89, 0xD8,                                        # mov eax, ebx
    0x66, 0xBA, PORT & 0xFF, PORT >> 8,                # mov dx, PORT
    0xEF,                                              # out dx, eax
    0xEB, 0xEC,                                        # jmp loop (-20)
])
assert COUNT[-1] == (256 - len(COUNT)) & 0xFF


class Port:
    """Records the guest's writes; ``reached`` is set at ``until`` writes."""

    def __init__(self, until: int = 0):
        self.values: list[int] = []
        self.until = until
        self.reached = threading.Event()

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        self.values.append(value)
        if self.until and len(self.values) >= self.until:
            self.reached.set()


@pytest.fixture(autouse=True)
def kvm():
    tiny.need_kvm()


def snapshot_counting_guest(path, after: int = 300, vcpus: int = 1):
    """Run the counting guest, snapshot it (left paused) after ``after``
    writes, stop it; the port's writes and the snapshot's result."""
    m = tiny.machine(vcpus)
    port = Port(after)
    m.pio.add(PORT, 4, port, threading.RLock(), "counter")
    tiny.long_mode(m, COUNT, vcpus)
    taken = {}

    def snap():
        if port.reached.wait(30):
            try:
                taken["result"] = snapshot.take(m, path)
                taken["paused"] = m.paused
                taken["writes"] = len(port.values)
                time.sleep(0.2)                 # a paused guest writes nothing more
                taken["writes_later"] = len(port.values)
            except Exception as e:              # reported by the test
                taken["error"] = e
        m.request_stop("test done", 0)

    t = threading.Thread(target=snap)
    t.start()
    tiny.run(m)
    t.join()
    if "error" in taken:
        raise taken["error"]
    return port.values, taken


def restore_and_run(path, writes: int = 50) -> tuple[list[int], int]:
    """Restore into a new machine, run until ``writes`` port writes: the
    writes, and the counter in memory before the guest ran."""
    snap = snapshot_format.read(path)
    snapshot.check_snapshot(snap)
    m = Machine(snap.config)
    try:
        m.build(snap)
    except BaseException:
        m.close()
        raise
    in_memory = m.memory.read_int(COUNTER, 8)
    port = Port(writes)
    m.pio.add(PORT, 4, port, threading.RLock(), "counter")
    stopper = threading.Thread(target=lambda: (port.reached.wait(30), m.request_stop("enough", 0)))
    stopper.start()
    tiny.run(m)
    stopper.join()
    return port.values, in_memory


def test_a_counting_guest_restored_twice_goes_on_from_the_saved_count(tmp_path):
    path = tmp_path / "snap"
    values, taken = snapshot_counting_guest(path)
    assert taken["paused"] is True                       # snapshot leaves the VM paused
    assert taken["writes_later"] == taken["writes"]
    saved = values[taken["writes"] - 1]
    assert values[:taken["writes"]] == list(range(1, saved + 1))
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "memory", "state.json"]
    for _ in range(2):
        after, in_memory = restore_and_run(path)
        # The pause may catch the guest between its store and its OUT (a loaded
        # host did): memory then holds the next count, the one it writes next.
        assert in_memory in (saved, saved + 1), (saved, in_memory)
        assert after[:50] == list(range(saved + 1, saved + 51)), (saved, after[:5])


def test_an_application_processor_waiting_for_its_start_up_ipi_is_restored_waiting(tmp_path):
    path = tmp_path / "snap"
    values, taken = snapshot_counting_guest(path, vcpus=2)
    saved = values[taken["writes"] - 1]
    snap = snapshot_format.read(path)
    m = Machine(snap.config)
    try:
        m.build(snap)
        states = [v.get_mp_state() for v in m.vcpus]
    finally:
        m.close()
    assert states[1] != lib.KVM_MP_STATE_RUNNABLE and states[0] == lib.KVM_MP_STATE_RUNNABLE, states
    after, _ = restore_and_run(path, writes=20)
    assert after[:20] == list(range(saved + 1, saved + 21))


def test_snapshot_into_an_existing_path_fails_and_the_vm_runs_on(tmp_path):
    path = tmp_path / "taken"
    path.mkdir()
    m = tiny.machine()
    port = Port(100)
    m.pio.add(PORT, 4, port, threading.RLock(), "counter")
    tiny.long_mode(m, COUNT)
    seen = {}

    def snap():
        port.reached.wait(30)
        try:
            snapshot.take(m, path)
        except snapshot_format.SnapshotError as e:
            seen["error"] = str(e)
        seen["paused"] = m.paused
        n = len(port.values)
        time.sleep(0.3)
        seen["ran_on"] = len(port.values) > n
        m.request_stop("test done", 0)

    t = threading.Thread(target=snap)
    t.start()
    tiny.run(m)
    t.join()
    assert "already exists" in seen["error"]
    assert seen["paused"] is False and seen["ran_on"] is True
    assert list(path.iterdir()) == []
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]     # no temporary left


def test_a_snapshot_with_a_cpu_feature_the_host_lacks_is_refused(tmp_path):
    path = tmp_path / "snap"
    snapshot_counting_guest(path, after=20)
    snap = snapshot_format.read(path)
    for row in snap.state["vcpus"][0]["cpuid"]:
        if row[0] == 7 and row[1] == 0:
            row[4] |= 1 << 30                           # ebx bit 30 (AVX512BW), added
    snap.manifest["cpu"]["cpuid"] = snap.state["vcpus"][0]["cpuid"]
    kvm = Kvm()
    supported = {(r[0], r[1]): r for r in kvm.supported_cpuid()}
    kvm.close()
    if supported[(7, 0)][4] & (1 << 30):
        pytest.skip("this host has AVX512BW")
    m = Machine(snap.config)
    try:
        with pytest.raises(MachineError, match=r"CPUID 0x7.0 ebx bit 30"):
            m.build(snap)
    finally:
        m.close()


ECHO = bytes([0x66, 0xBA, PORT & 0xFF, PORT >> 8,      # mov dx, PORT
              0xED,                                    # in eax, dx
              0xEF,                                    # out dx, eax
              0xEB, 0xFE])                             # jmp .


class PausingPort:
    """Its first read pauses the machine before answering, so the vCPU parks
    between the IN's exit and the KVM_RUN that would put the value in RAX."""

    def __init__(self, machine, answer: int):
        self.machine, self.answer = machine, answer
        self.reads = 0
        self.values: list[int] = []
        self.read_started = threading.Event()

    def read(self, offset, size):
        self.reads += 1
        if self.reads == 1 and self.machine is not None:
            self.read_started.set()
            deadline = time.monotonic() + 10
            while self.machine.running.is_set() and time.monotonic() < deadline:
                time.sleep(0.001)
        return self.answer

    def write(self, offset, size, value):
        self.values.append(value)


def test_a_vcpu_paused_after_an_in_exit_is_saved_with_the_value_read(tmp_path):
    """The IN's emulation is finished before the save (KVM_RUN with
    immediate_exit): the restored guest goes on with the value it read and
    does not read the port again."""
    path = tmp_path / "snap"
    m = tiny.machine()
    port = PausingPort(m, 0x1234)
    m.pio.add(PORT, 4, port, threading.RLock(), "echo")
    tiny.long_mode(m, ECHO)
    seen = {}

    def snap():
        if port.read_started.wait(30):
            m.pause()
            seen["result"] = snapshot.take(m, path)
            seen["values"] = list(port.values)
        m.request_stop("test done", 0)

    t = threading.Thread(target=snap)
    t.start()
    tiny.run(m)
    t.join()
    assert seen["values"] == []                        # paused before the OUT
    snap_ = snapshot_format.read(path)
    m2 = Machine(snap_.config)
    m2.build(snap_)
    port2 = PausingPort(None, 0xDEAD)
    m2.pio.add(PORT, 4, port2, threading.RLock(), "echo")
    stopper = threading.Timer(1.0, m2.request_stop, ("enough", 0))
    stopper.start()
    tiny.run(m2)
    assert port2.values == [0x1234] and port2.reads == 0


def kvmkit(*args, timeout=60):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True,
                          timeout=timeout)


def counter_in(path) -> int:
    with open(path / "memory", "rb") as f:
        f.seek(COUNTER)
        return int.from_bytes(f.read(8), "little")


def test_the_commands_snapshot_a_restored_vm_and_restore_it_again(tmp_path):
    """`kvmkit run --restore` runs the counting guest (nobody claims its port);
    `kvmkit snapshot NAME PATH --resume` saves it and lets it run on,
    `kvmkit snapshot NAME PATH` leaves it paused; each snapshot's counter is
    further on; a bad snapshot path is refused with one line."""
    import subprocess
    import sys
    first = tmp_path / "first"
    snapshot_counting_guest(first, after=50)
    name = f"snap-tiny-{os.getpid()}"
    r = kvmkit("check", "--restore", str(first))
    assert r.returncode == 0 and r.stdout.startswith(f"ok: restore {first}: tiny: 1 vCPU, 16M memory"), r
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "run", "--restore", str(first),
                             "--name", name], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while kvmkit("status", name).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
        r = kvmkit("snapshot", name, str(tmp_path / "second"), "--resume")
        assert r.returncode == 0 and "the VM is running" in r.stdout, r
        time.sleep(0.5)
        r = kvmkit("snapshot", name, str(tmp_path / "third"))
        assert r.returncode == 0 and "the VM is paused" in r.stdout, r
        assert "paused" in kvmkit("status", name).stdout
        r = kvmkit("snapshot", name, str(tmp_path / "third"))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "already exists" in r.stderr, r
        assert kvmkit("kill", name).returncode == 0
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 3, err                    # killed
    a, b, c = (counter_in(tmp_path / n) for n in ("first", "second", "third"))
    assert a < b < c, (a, b, c)
    values, _ = restore_and_run(tmp_path / "third", writes=5)
    # The pause may have caught the guest between its store and its OUT (no
    # exit told where it was): its next write is the stored count or the next.
    assert values[0] in (c, c + 1) and values[:5] == list(range(values[0], values[0] + 5)), (c, values[:5])


def test_a_device_without_state_support_refuses_the_snapshot_and_the_vm_runs_on(tmp_path):
    pytest.importorskip("kvmkit.device_state")
    from kvmkit.device_context import DeviceContext
    path = tmp_path / "snap"
    m = tiny.machine()
    port = Port(50)
    m.pio.add(PORT, 4, port, threading.RLock(), "counter")
    m.devices.append((DeviceContext(m, "stateless.0"), object()))     # no snapshot_state()
    tiny.long_mode(m, COUNT)
    seen = {}

    def snap():
        port.reached.wait(30)
        try:
            snapshot.take(m, path)
        except snapshot_format.SnapshotError as e:
            seen["error"] = str(e)
        n = len(port.values)
        time.sleep(0.3)
        seen["ran_on"] = len(port.values) > n and not m.paused
        m.request_stop("test done", 0)

    t = threading.Thread(target=snap)
    t.start()
    tiny.run(m)
    t.join()
    assert "stateless.0" in seen.get("error", "") and "\n" not in seen["error"], seen
    assert seen["ran_on"] is True
    assert list(tmp_path.iterdir()) == []
