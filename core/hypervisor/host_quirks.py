"""Help for hosts whose KVM is nested and paravirtual (kvm_pvm).

On such hosts guest kernel code runs through KVM's instruction emulator,
which lacks a few instructions.  This module is the one place that knows:
it detects the host, adds the kernel command-line words that keep Linux away
from those instructions, and completes the two instructions Linux cannot
avoid (``int3``, ``fwait``) when the emulator gives up on them.  On ordinary
hardware-virtualised KVM none of this is active.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("kvmkit.host_quirks")

PVM_MODULE = "/sys/module/kvm_pvm"

# Features the emulator cannot execute at CPL 0 (or that lead Linux to such
# instructions).  Linux 6.1 reads at most 128 characters of clearcpuid=.
CLEARCPUID = ("cx16,smap,popcnt,fsgsbase,rdrand,rdseed,rdpid,invpcid,pcid,rdtscp,"
              "avx,avx2,avx512f,aes,pclmulqdq")
assert len(CLEARCPUID) < 128

CMDLINE_WORDS = ("nopv", "noxsave", "nopcid", "nofsgsbase", "nowatchdog", "nosoftlockup",
                 "tsc=reliable", "no_timer_check", f"clearcpuid={CLEARCPUID}")

OPCODE_INT3 = 0xCC
OPCODE_FWAIT = 0x9B
VECTOR_BP = 3


def detect() -> bool:
    """True on a host whose KVM is the nested paravirtual kind."""
    return os.path.isdir(PVM_MODULE)


def resolve(setting: str) -> bool:
    """``setting`` is the machine file's ``host_quirks``: auto, on or off."""
    active = detect() if setting == "auto" else setting == "on"
    if active:
        log.warning("host quirks active (paravirtual nested KVM%s): adding kernel flags "
                    "and int3/fwait assists", " detected" if setting == "auto" else " forced")
    return active


def extend_cmdline(cmdline: str) -> str:
    """Append the quirk words the user has not already given (by key)."""
    present = {w.split("=", 1)[0] for w in cmdline.split()}
    extra = [w for w in CMDLINE_WORDS if w.split("=", 1)[0] not in present]
    return " ".join([cmdline, *extra]).strip()


def emulation_failure_insn(data: bytes) -> bytes:
    """The failing instruction's bytes from ``kvm_run.internal.data``:
    data[0] holds flags, the low byte of data[1] the length, the bytes follow."""
    if len(data) < 9:
        return b""
    length = min(data[8], 15, len(data) - 9)
    return bytes(data[9:9 + length])


def assist(vcpu, insn: bytes) -> bool:
    """Complete an instruction the emulator refused.  True if handled."""
    if not insn:
        return False
    if insn[0] == OPCODE_INT3:
        regs = vcpu.get_regs()
        regs.rip += 1
        vcpu.set_regs(regs)
        vcpu.inject_exception(VECTOR_BP)
        return True
    if insn[0] == OPCODE_FWAIT:
        regs = vcpu.get_regs()
        regs.rip += 1
        vcpu.set_regs(regs)
        return True
    return False
