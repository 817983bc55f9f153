"""Hand-made guests of a few bytes on a real kvmkit Machine (no kernel, no
devices): the machine's platform (RAM, irqchip, PCI host, reset control and
vector) with vCPUs set up directly in long or real mode, run by
Machine.run() (vCPU threads and the run loop's watchdog) until it stops."""
from __future__ import annotations

import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvmkit.boot import pagetables
from kvmkit.config import KernelConfig, MachineConfig
from kvmkit.hypervisor import cpu_setup
from kvmkit.machine import Machine

CODE_AT = 0x100000
REAL_CODE_AT = 0x7C00
TIMEOUT_CODE = 99


def need_kvm() -> None:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return
    if os.environ.get("KVMKIT_REQUIRE_KVM") == "1":
        pytest.fail("/dev/kvm is not usable here (KVMKIT_REQUIRE_KVM=1 makes this a failure)")
    pytest.skip("/dev/kvm is not usable here")


def machine(vcpus: int = 1, stall_timeout: float = 0.0, quirks: bool = False) -> Machine:
    cfg = MachineConfig("tiny", 16 << 20, vcpus, KernelConfig(Path("/nonexistent"), None, ""),
                        stall_timeout=stall_timeout)
    m = Machine(cfg)
    m.build_platform()
    m.quirks = quirks
    return m


def long_mode(m: Machine, code: bytes, vcpus: int = 1) -> None:
    """vCPU 0 at CODE_AT in 64-bit mode (identity map of 4 GiB); others wait for a SIPI."""
    gdt_base, gdt_limit = pagetables.write_gdt(m.memory)
    cr3 = pagetables.write_identity_map(m.memory)
    m.memory.write(CODE_AT, code)
    boot = SimpleNamespace(entry=CODE_AT, boot_params=0, cr3=cr3, gdt_base=gdt_base, gdt_limit=gdt_limit)
    supported = m.kvm.supported_cpuid()
    for i in range(vcpus):
        cpu_setup.setup_vcpu(m.add_vcpu(i), supported, vcpus, boot)


def real_mode(m: Machine, code: bytes) -> None:
    """vCPU 0 in real mode at 0000:7C00, as a boot sector starts."""
    m.memory.write(REAL_CODE_AT, code)
    vcpu = m.add_vcpu(0)
    sregs = vcpu.get_sregs()
    sregs.cs.base, sregs.cs.selector = 0, 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = REAL_CODE_AT, 2
    vcpu.set_regs(regs)


def reset_state(m: Machine) -> None:
    """vCPU 0 exactly as KVM creates it: the state after a CPU reset (CS base
    0xFFFF0000, IP 0xFFF0), i.e. what a machine does on power-on."""
    m.add_vcpu(0)


def run(m: Machine, timeout: float = 20.0):
    """Machine.run() until it stops; stopped with TIMEOUT_CODE after ``timeout``."""
    timer = threading.Timer(timeout, m.request_stop, ("test timeout", TIMEOUT_CODE))
    timer.start()
    try:
        return m.run()
    finally:
        timer.cancel()
        m.close()
