"""Every way a hand-made guest ends ends the VM (issue 18): the reset control
register, the reset vector (real mode, the CPU's reset state, and from long
mode through 0xFFFFFFF0), halted for good, code run from nowhere, a storm of
assisted emulation failures, and a silent spin with stall_timeout.  Each
guest is a few bytes on a real Machine: its vCPU threads and the run loop's
watchdog decide, as for a Linux guest."""
import re
import time

import pytest

import tiny
from kvmkit import chipset, endings
from kvmkit.hypervisor import host_quirks
from kvmkit.plugin_api import EXIT_ERROR, EXIT_GUEST_HALTED, EXIT_OK, EXIT_STALLED

OUT_CF9 = bytes([0x66, 0xBA, 0xF9, 0x0C, 0xEE])      # mov dx, 0xcf9 ; out dx, al
CLI_HLT = bytes([0xFA, 0xF4, 0xEB, 0xFC])              # cli ; hlt ; jmp back to cli
STI_HLT = bytes([0xFB, 0xF4, 0xEB, 0xFC])              # sti ; hlt ; jmp back (an idle guest)
SPIN = bytes([0xEB, 0xFE])                             # jmp .


@pytest.fixture(autouse=True)
def kvm():
    tiny.need_kvm()


def test_writing_the_reset_bits_to_0xcf9_resets():
    m = tiny.machine()
    # 0x02 (SYS_RST alone) only arms a hard reset; 0x06 adds RST_CPU: reset.
    tiny.long_mode(m, b"\xb0\x02" + OUT_CF9 + b"\xb0\x06\xee" + SPIN)
    stop = tiny.run(m)
    assert (stop.code, stop.reason) == (EXIT_OK, "guest reset (port 0xCF9, hard)")
    assert m.pci.reset_control.value == chipset.SYS_RST     # the 0x02 write was kept, not acted on


def test_ljmp_to_the_real_mode_reset_vector_resets():
    m = tiny.machine()
    tiny.real_mode(m, b"\xea\xf0\xff\x00\xf0")                # ljmp 0xf000:0xfff0
    stop = tiny.run(m)
    assert (stop.code, stop.reason) == (EXIT_OK, "guest reset (port 0xCF9, hard)")
    [vcpu] = m.status()["vcpu_exits"]
    assert vcpu["last_exit"] == "io" and vcpu["exits"] == 1, vcpu
    # where it was when it last left KVM_RUN: after the stub's out, or halted after it
    assert vcpu["rip"] in ("0xfff7", "0xfff9"), vcpu


def test_a_cpu_in_its_reset_state_runs_the_vector_at_0xfffffff0():
    m = tiny.machine()
    tiny.reset_state(m)
    stop = tiny.run(m)
    assert (stop.code, stop.reason) == (EXIT_OK, "guest reset (port 0xCF9, hard)")


def test_jump_from_long_mode_to_0xfffffff0_resets():
    m = tiny.machine()
    tiny.long_mode(m, b"\xb8\xf0\xff\xff\xff\xff\xe0")      # mov eax, 0xfffffff0 ; jmp rax
    stop = tiny.run(m)
    assert (stop.code, stop.reason) == (EXIT_OK, "guest reset (port 0xCF9, hard)")
    assert m.status()["vcpu_exits"][0]["rip"] in ("0xfffffff7", "0xfffffff9")


@pytest.mark.parametrize("vcpus", [1, 2])
def test_cli_hlt_ends_as_halted(vcpus):
    """vCPU 0 halts with interrupts off; a second vCPU never gets its start-up IPI."""
    m = tiny.machine(vcpus=vcpus)
    tiny.long_mode(m, CLI_HLT, vcpus=vcpus)
    t0 = time.monotonic()
    stop = tiny.run(m)
    took = time.monotonic() - t0
    assert stop.code == EXIT_GUEST_HALTED, stop
    assert "vCPU 0 halted with interrupts off at RIP 0x100002" in stop.reason
    if vcpus == 2:
        assert "vCPU 1 waiting for a start-up IPI" in stop.reason
    assert took < endings.PROBE_AFTER_S + endings.HALT_GRACE_S + 3, took


def test_an_idle_guest_halted_with_interrupts_on_keeps_running():
    m = tiny.machine()
    tiny.long_mode(m, STI_HLT)
    stop = tiny.run(m, timeout=endings.PROBE_AFTER_S + endings.HALT_GRACE_S + 2.5)
    assert stop.code == tiny.TIMEOUT_CODE, stop


def test_jump_into_unbacked_memory_stops_with_one_line():
    m = tiny.machine()
    tiny.long_mode(m, b"\xb8\x00\x00\x00\xe0\xff\xe0")      # mov eax, 0xe0000000 ; jmp rax
    stop = tiny.run(m)
    assert stop == endings.Stop("vCPU 0: executing code outside guest memory: RIP 0xe0000000, "
                                "guest-physical 0xe0000000", EXIT_ERROR)


def test_repeated_assisted_emulation_failure_is_a_stuck_guest():
    """fwait at CPL 0 fails in the nested host's emulator and the quirk assist
    completes it; in a two-byte loop it is the same failure at the same RIP."""
    if not host_quirks.detect():
        pytest.skip("only the nested paravirtual host emulates fwait at CPL 0")
    m = tiny.machine(quirks=True)
    tiny.long_mode(m, b"\x9b\xeb\xfd")                      # fwait ; jmp back
    t0 = time.monotonic()
    stop = tiny.run(m, timeout=60)
    assert stop.code == EXIT_ERROR, stop
    m = re.fullmatch(r"vCPU 0: stuck: the same emulation failure \(9b eb fd [0-9a-f ]*\) at RIP "
                     r"0x100000 (\d+) times in a row", stop.reason)
    assert m and int(m[1]) >= endings.STORM_COUNT, stop
    assert time.monotonic() - t0 >= endings.STORM_MIN_S


def test_a_silent_spin_stops_after_stall_timeout():
    m = tiny.machine(stall_timeout=1.0)
    tiny.long_mode(m, SPIN)
    t0 = time.monotonic()
    stop = tiny.run(m)
    took = time.monotonic() - t0
    assert stop.code == EXIT_STALLED, stop
    # the watchdog's looks while it was quiet show where it spins
    assert stop.reason == ("stalled: no vCPU exited for 1 s ([machine] stall_timeout); "
                           "vCPU 0 0 exits (last none, RIP 0x100000)"), stop
    assert 1.0 <= took < 5, took


def test_without_stall_timeout_a_silent_spin_runs_on():
    m = tiny.machine()
    tiny.long_mode(m, SPIN)
    stop = tiny.run(m, timeout=2.5)
    assert stop.code == tiny.TIMEOUT_CODE, stop
