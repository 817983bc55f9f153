"""Guest endings without KVM: the reset control register, the reset stub's
bytes, the failure streak, the run loop's watchdog with fake vCPU threads,
and code fetched from outside guest memory through handle_exit."""
import collections
import struct
import threading
from types import SimpleNamespace

import pytest

from kvmkit import chipset, endings
from kvmkit.bus import Bus
from kvmkit.hypervisor._kvm import ffi, lib
from kvmkit.memory import GuestMemory
from kvmkit.pci import PciHost
from kvmkit.plugin_api import EXIT_ERROR, EXIT_GUEST_HALTED, EXIT_OK, EXIT_STALLED
from kvmkit.vcpu import handle_exit


# -- reset control, through the PCI host's ports ---------------------------------------
def pci_ports():
    stops = []
    host = PciHost()
    host.reset_control = chipset.ResetControl(lambda reason, code: stops.append((reason, code)))
    pio = Bus("pio")
    for base, size, handler in host.pio_ranges():
        pio.add(base, size, handler, threading.RLock(), "pci-host")
    return pio, host, stops


def test_0xcf9_resets_only_when_rst_cpu_is_written():
    pio, host, stops = pci_ports()
    pio.write(0xCF9, 1, chipset.SYS_RST)                       # Linux reboot=pci: arm first
    assert stops == [] and pio.read(0xCF9, 1) == chipset.SYS_RST
    pio.write(0xCF9, 1, chipset.SYS_RST | chipset.RST_CPU)
    assert stops == [("guest reset (port 0xCF9, hard)", EXIT_OK)]
    pio.write(0xCF9, 1, chipset.RST_CPU)
    assert stops[-1] == ("guest reset (port 0xCF9, soft)", EXIT_OK)


def test_0xcf9_leaves_config_address_alone():
    pio, host, stops = pci_ports()
    pio.write(0xCF8, 4, 0x8000_0810)
    assert pio.read(0xCF8, 4) == 0x8000_0810
    pio.write(0xCF9, 1, 0x00)                                  # a byte at 0xCF9 is the reset register
    assert pio.read(0xCF8, 4) == 0x8000_0810 and stops == []
    assert pio.read(0xCF9, 2) == 0x08                          # a 16-bit read is CONFIG_ADDRESS's


def test_without_reset_control_0xcf9_is_part_of_config_address():
    host = PciHost()
    host.address = 0x8000_1234
    assert host.address_port.read(1, 1) == 0x12


def test_reset_stub_is_the_same_code_in_every_mode():
    # mov al, 6 ; mov dh, 0x0c ; mov dl, 0xf9 ; out dx, al ; cli ; hlt ; jmp hlt
    assert chipset.RESET_STUB == bytes.fromhex("b006 b60c b2f9 ee fa f4 ebfd")
    assert 11 + struct.unpack("b", chipset.RESET_STUB[10:11])[0] == chipset.RESET_STUB.index(0xF4)
    page = chipset.reset_page()
    assert page[0xFF0:0xFF0 + 11] == chipset.RESET_STUB and len(page) == chipset.PAGE
    mem = GuestMemory(16 << 20, backing=bytearray(16 << 20))
    chipset.install_reset_vector(mem)
    assert mem.read(0xFFFF0, 11) == chipset.RESET_STUB


# -- the failure streak ----------------------------------------------------------------
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_streak_needs_the_same_failure_back_to_back_for_long_enough():
    exits = collections.Counter()
    clock = Clock()
    streak = endings.FailureStreak(exits, clock)
    for _ in range(endings.STORM_COUNT - 1):
        exits[lib.KVM_EXIT_INTERNAL_ERROR] += 1
        assert not streak.record(0x1000, b"\x9b")
    clock.t += endings.STORM_MIN_S
    exits[lib.KVM_EXIT_INTERNAL_ERROR] += 1
    assert streak.record(0x1000, b"\x9b")


def test_streak_breaks_on_another_exit_or_another_rip():
    exits = collections.Counter()
    clock = Clock()
    streak = endings.FailureStreak(exits, clock)
    for i in range(3 * endings.STORM_COUNT):
        exits[lib.KVM_EXIT_INTERNAL_ERROR] += 1
        if i % 500 == 0:
            exits[lib.KVM_EXIT_IO] += 1                       # the guest did something else
        clock.t += 0.01
        assert not streak.record(0x1000, b"\x9b")
    for i in range(3 * endings.STORM_COUNT):
        exits[lib.KVM_EXIT_INTERNAL_ERROR] += 1
        clock.t += 0.01
        assert not streak.record(0x1000 + i % 2, b"\x9b")      # two sites take turns


# -- the watchdog, with fake vCPU threads ------------------------------------------------
class FakeThread:
    def __init__(self, index, why=None):
        self.vcpu = SimpleNamespace(index=index, run=None)
        self.exits = collections.Counter()
        self.why = why                  # what stopped_for_good() would say
        self.watch = SimpleNamespace(answer=None, probe_wanted=False, last_reason=None,
                                     left_kvm=False)
        self.pokes = 0

    def poke(self):                     # the thread answers at once
        self.pokes += 1
        self.watch.answer = (sum(self.exits.values()), self.why)


def run_ticks(dog, clock, seconds, step=0.2, paused=False):
    for _ in range(round(seconds / step)):
        clock.t += step
        stop = dog.tick(paused=paused)
        if stop is not None:
            return stop
    return None


def test_all_vcpus_stopped_for_good_end_as_halted_after_the_grace():
    clock = Clock()
    threads = [FakeThread(0, "halted with interrupts off at RIP 0x1"),
               FakeThread(1, "waiting for a start-up IPI")]
    dog = endings.Watchdog(threads, clock=clock)
    assert run_ticks(dog, clock, endings.PROBE_AFTER_S + endings.HALT_GRACE_S - 0.3) is None
    stop = run_ticks(dog, clock, 1.0)
    assert stop == endings.Stop("guest halted: every vCPU stopped for good (vCPU 0 halted with "
                                "interrupts off at RIP 0x1; vCPU 1 waiting for a start-up IPI)",
                                EXIT_GUEST_HALTED)


def test_one_vcpu_still_runnable_keeps_the_guest_alive():
    clock = Clock()
    threads = [FakeThread(0, "halted with interrupts off at RIP 0x1"), FakeThread(1, None)]
    dog = endings.Watchdog(threads, clock=clock)
    assert run_ticks(dog, clock, 30) is None
    assert threads[1].pokes > 0


def test_an_exit_after_the_probe_restarts_the_grace():
    clock = Clock()
    t = FakeThread(0, "halted with interrupts off at RIP 0x1")
    dog = endings.Watchdog([t], clock=clock)
    for _ in range(10):                                        # an exit every 0.8 s: never quiet long
        assert run_ticks(dog, clock, 0.8) is None
        t.exits[lib.KVM_EXIT_IO] += 1
    assert run_ticks(dog, clock, 5) is not None


def test_a_paused_vm_is_neither_halted_nor_stalled():
    clock = Clock()
    t = FakeThread(0, "halted with interrupts off at RIP 0x1")
    dog = endings.Watchdog([t], stall_timeout=1.0, clock=clock)
    assert run_ticks(dog, clock, 10, paused=True) is None and t.pokes == 0


def test_stall_timeout_counts_from_the_last_exit():
    clock = Clock()
    t = FakeThread(0, None)
    dog = endings.Watchdog([t], stall_timeout=5.0, clock=clock)
    assert run_ticks(dog, clock, 3) is None
    t.exits[lib.KVM_EXIT_IO] += 1
    t.watch.last_reason = lib.KVM_EXIT_IO
    assert run_ticks(dog, clock, 4.8) is None                  # the exit was seen at the next tick
    stop = run_ticks(dog, clock, 0.6)
    assert stop.code == EXIT_STALLED and "no vCPU exited for 5 s" in stop.reason
    assert "vCPU 0 1 exits (last io)" in stop.reason           # no kvm_run page: no RIP to show


# -- code from nowhere, through handle_exit ------------------------------------------------
class NowhereVcpu(SimpleNamespace):
    def get_regs(self):
        return SimpleNamespace(rip=self.rip, rflags=2)

    def get_sregs(self):
        return SimpleNamespace(cs=SimpleNamespace(base=self.cs_base), cr0=self.cr0)

    def translate(self, linear):
        return self.page_tables.get(linear)


def fetch_failure(rip, cs_base=0, cr0=0x80000011, page_tables=None):
    raw = struct.pack("<QQ", 0, 0x1000).ljust(128, b"\0")          # no instruction bytes
    internal = SimpleNamespace(suberror=lib.KVM_INTERNAL_ERROR_EMULATION, ndata=6,
                               data=list(struct.unpack("<16Q", raw)))
    run_buf = memoryview(bytearray(8192))         # the mapped kvm_run, as the exit path reads it
    struct.pack_into("<I", run_buf, ffi.offsetof("struct kvm_run", "exit_reason"),
                     lib.KVM_EXIT_INTERNAL_ERROR)
    return NowhereVcpu(index=1, run=SimpleNamespace(exit_reason=lib.KVM_EXIT_INTERNAL_ERROR),
                       run_buf=run_buf, internal=internal, rip=rip, cs_base=cs_base, cr0=cr0,
                       page_tables=page_tables if page_tables is not None else {rip: rip})


@pytest.mark.parametrize("quirks", [False, True])
def test_fetch_outside_memory_names_vcpu_rip_and_address(quirks):
    mem = GuestMemory(16 << 20, backing=bytearray(16 << 20))
    v = fetch_failure(0xFFFF_FFFF_8000_0000, page_tables={0xFFFF_FFFF_8000_0000: 0xE000_0000})
    stop = handle_exit(v, Bus("pio"), Bus("mmio"), quirks=quirks, memory=mem)
    assert stop == endings.Stop("vCPU 1: executing code outside guest memory: RIP "
                                "0xffffffff80000000, guest-physical 0xe0000000", EXIT_ERROR)


def test_fetch_in_real_mode_uses_the_code_segment():
    mem = GuestMemory(16 << 20, backing=bytearray(16 << 20))
    v = fetch_failure(0x0010, cs_base=0xF00_0000, cr0=0x10)
    stop = handle_exit(v, Bus("pio"), Bus("mmio"), memory=mem)
    assert stop.reason.endswith("RIP 0x10, guest-physical 0xf000010")
    v = fetch_failure(0xFFF0, cs_base=0xFFFF_0000, cr0=0x10)       # the reset page is backed
    assert "outside guest memory" not in handle_exit(v, Bus("pio"), Bus("mmio"), memory=mem).reason


def test_fetch_from_unmapped_linear_address():
    mem = GuestMemory(16 << 20, backing=bytearray(16 << 20))
    v = fetch_failure(0xDEAD_0000, page_tables={})
    stop = handle_exit(v, Bus("pio"), Bus("mmio"), memory=mem)
    assert stop.reason == "vCPU 1: executing code at RIP 0xdead0000, which its page tables do not map"
