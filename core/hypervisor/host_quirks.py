"""Help for hosts whose KVM is nested and paravirtual (kvm_pvm).

On such hosts guest kernel code runs through KVM's instruction emulator,
which lacks a few instructions.  This module is the one place that knows:
it detects the host, adds the kernel command-line words that keep Linux away
from those instructions, and completes the instructions Linux cannot avoid
(``int3``, ``fwait``, ``ldmxcsr``/``stmxcsr``) when the emulator gives up on
them.  On ordinary hardware-virtualised KVM none of this is active.
"""
from __future__ import annotations

import logging
import os

from . import modrm

log = logging.getLogger("kvmkit.host_quirks")

PVM_MODULE = "/sys/module/kvm_pvm"

# Features the emulator cannot execute at CPL 0 (or that lead Linux to such
# instructions).  Linux 6.1 reads at most 128 characters of clearcpuid=.
# ssse3/sse4_x: keeps the SIMD crypto glue (blake2s, used by the RNG, etc.) on
# its generic code; the emulator cannot execute SSE register instructions.
CLEARCPUID = ("cx16,smap,popcnt,fsgsbase,rdrand,rdseed,rdpid,invpcid,pcid,rdtscp,"
              "avx,avx2,avx512f,aes,pclmulqdq,ssse3,sse4_1,sse4_2")
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


def extend_cmdline(cmdline: str, tsc_khz: int | None = None) -> str:
    """Append the quirk words the user has not already given (by key).

    ``tsc_khz`` (the vCPUs' TSC rate, KVM_GET_TSC_KHZ): with ``nopv`` the
    guest has no kvmclock, and without an HPET or ACPI PM timer it cannot
    calibrate its TSC, marks it unstable and keeps time by counting timer
    ticks, which an emulated kernel loses by the thousand: its clock falls
    minutes behind.  ``tsc_early_khz`` gives it the rate, so it keeps time
    with the TSC as on real hardware."""
    words = list(CMDLINE_WORDS)
    if tsc_khz:
        words.append(f"tsc_early_khz={tsc_khz}")
    present = {w.split("=", 1)[0] for w in cmdline.split()}
    extra = [w for w in words if w.split("=", 1)[0] not in present]
    return " ".join([cmdline, *extra]).strip()


def emulation_failure_insn(data: bytes) -> bytes:
    """The failing instruction's bytes from ``kvm_run.internal.data``:
    data[0] holds flags, the low byte of data[1] the length, the bytes follow."""
    if len(data) < 9:
        return b""
    length = min(data[8], 15, len(data) - 9)
    return bytes(data[9:9 + length])


def _guest_linear(vcpu, memory, linear: int, length: int) -> list[tuple[int, int]]:
    """Guest-physical pieces of a linear range (split at page boundaries)."""
    pieces = []
    while length > 0:
        chunk = min(length, 0x1000 - (linear & 0xFFF))
        gpa = vcpu.translate(linear)
        if gpa is None or not memory.contains(gpa, chunk):
            raise modrm.DecodeError(f"operand at {linear:#x} is not mapped to guest RAM")
        pieces.append((gpa, chunk))
        linear += chunk
        length -= chunk
    return pieces


def _mxcsr(vcpu, memory, insn: bytes) -> bool:
    """ldmxcsr m32 (0F AE /2) and stmxcsr m32 (0F AE /3)."""
    try:
        op = modrm.decode(insn)
    except modrm.DecodeError:
        return False
    if op.opcode != b"\x0f\xae" or op.reg not in (2, 3):
        return False
    regs = vcpu.get_regs()
    seg_base = 0
    if op.segment:
        seg_base = getattr(vcpu.get_sregs(), op.segment).base
    try:
        pieces = _guest_linear(vcpu, memory, op.address(regs, seg_base), 4)
    except modrm.DecodeError:
        return False
    fpu = vcpu.get_fpu()
    if op.reg == 2:
        value = int.from_bytes(b"".join(memory.read(g, n) for g, n in pieces), "little")
        if value & ~0xFFFF:              # reserved bits: the CPU raises #GP
            return False
        fpu.mxcsr = value
        vcpu.set_fpu(fpu)
    else:
        data = int(fpu.mxcsr).to_bytes(4, "little")
        for gpa, n in pieces:
            memory.write(gpa, data[:n])
            data = data[n:]
    regs.rip += op.length
    vcpu.set_regs(regs)
    return True


def assist(vcpu, insn: bytes, memory=None) -> bool:
    """Complete an instruction the emulator refused.  True if handled."""
    if not insn:
        return False
    if memory is not None and _mxcsr(vcpu, memory, insn):
        return True
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
