"""A vCPU's and the VM's KVM state as plain values, for snapshots.

Knows KVM and nothing about devices.  Each struct KVM hands out is kept as
its raw bytes (base64 in JSON): the layout is the kernel header's, and its
size is checked on restore (a snapshot from a kernel whose structs differ is
refused, not misread).  MSRs are a list of ``[index, value]`` pairs: those
KVM_GET_MSR_INDEX_LIST names that KVM_GET_MSRS could read.

Restore order (what KVM needs):

1. CPUID first: KVM checks MSR writes and XSAVE features against it.
2. sregs before regs and before the LAPIC: sregs carry EFER and CR0/CR4
   (what mode the registers are in) and apic_base (whether the LAPIC is on,
   x2APIC or not: KVM_SET_LAPIC on a disabled LAPIC is refused or lost).
3. XSAVE (else FPU), XCRs, debug registers, the LAPIC.
4. MSRs after the LAPIC (the TSC-deadline MSR is kept only in deadline
   mode), the TSC before the TSC deadline.
5. vCPU events (pending exceptions, NMIs, interrupt shadow) and the MP state
   last: setting registers may clear what they describe.

Time: a restored guest's clocks jump forward by the wall-clock time that
passed since the snapshot (its TSC by that many ticks at the saved rate, its
kvmclock by that many nanoseconds), as if it had been paused; its timers
that fell due in between fire at once.

On the nested paravirtual KVM of the project's machines (kvm_pvm) every
ioctl above works, but the TSC is not the guest's own: KVM ignores
host-initiated writes of MSR_IA32_TSC (a read returns the host's count) and
the guest's RDTSC reads the host's TSC at a fixed offset.  A restored
guest's TSC-based clock there moves on by the real time since the snapshot
whatever is set; it cannot be put back.
"""
from __future__ import annotations

import base64
import time

from ._kvm import lib

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
IRQCHIPS = (("pic_master", lib.KVM_IRQCHIP_PIC_MASTER), ("pic_slave", lib.KVM_IRQCHIP_PIC_SLAVE),
            ("ioapic", lib.KVM_IRQCHIP_IOAPIC))

# name -> (get ioctl, set ioctl, struct size)
_VCPU_STRUCTS = {
    "regs": (lib.KVM_GET_REGS, lib.KVM_SET_REGS, lib.KVMKIT_SIZEOF_REGS),
    "sregs": (lib.KVM_GET_SREGS, lib.KVM_SET_SREGS, lib.KVMKIT_SIZEOF_SREGS),
    "fpu": (lib.KVM_GET_FPU, lib.KVM_SET_FPU, lib.KVMKIT_SIZEOF_FPU),
    "xsave": (lib.KVM_GET_XSAVE, lib.KVM_SET_XSAVE, lib.KVMKIT_SIZEOF_XSAVE),
    "xcrs": (lib.KVM_GET_XCRS, lib.KVM_SET_XCRS, lib.KVMKIT_SIZEOF_XCRS),
    "debugregs": (lib.KVM_GET_DEBUGREGS, lib.KVM_SET_DEBUGREGS, lib.KVMKIT_SIZEOF_DEBUGREGS),
    "lapic": (lib.KVM_GET_LAPIC, lib.KVM_SET_LAPIC, lib.KVMKIT_SIZEOF_LAPIC),
    "events": (lib.KVM_GET_VCPU_EVENTS, lib.KVM_SET_VCPU_EVENTS, lib.KVMKIT_EVENTS_SIZE),
    "mp_state": (lib.KVM_GET_MP_STATE, lib.KVM_SET_MP_STATE, lib.KVMKIT_SIZEOF_MP_STATE),
}
RESTORE_ORDER = ("sregs", "regs", "xsave", "fpu", "xcrs", "debugregs", "lapic")   # then MSRs, events, mp_state


class StateError(ValueError):
    """Saved state that does not fit this host's KVM (the message says which part)."""


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _raw(state: dict, key: str, size: int, where: str) -> bytes:
    value = state.get(key)
    if not isinstance(value, str):
        raise StateError(f"{where}: {key} is missing")
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise StateError(f"{where}: {key} is not base64") from None
    if len(data) != size:
        raise StateError(f"{where}: {key} is {len(data)} bytes, this kernel's struct is {size} "
                         "(a snapshot from another kernel version)")
    return data


def structs_of(kvm) -> tuple[str, ...]:
    """The vCPU structs this host's KVM saves: XSAVE instead of the FPU where it can."""
    names = ["regs", "sregs", "lapic", "events", "mp_state"]
    names.append("xsave" if kvm.check_extension(lib.KVM_CAP_XSAVE) else "fpu")
    if kvm.check_extension(lib.KVM_CAP_XCRS):
        names.append("xcrs")
    if kvm.check_extension(lib.KVM_CAP_DEBUGREGS):
        names.append("debugregs")
    return tuple(names)


def save_vcpu(vcpu, structs: tuple[str, ...], msr_indices: list[int]) -> dict:
    """Everything KVM keeps of ``vcpu`` (stopped outside KVM_RUN)."""
    state: dict = {"index": vcpu.index, "cpuid": vcpu.cpuid}
    for name in structs:
        get, _set, size = _VCPU_STRUCTS[name]
        state[name] = _b64(vcpu.get_raw(get, size, f"vCPU {vcpu.index}: KVM_GET_{name.upper()}"))
    state["msrs"] = [[i, v] for i, v in vcpu.get_msrs(msr_indices).items()]
    return state


def check_vcpu(state, index: int) -> None:
    """Raise StateError unless ``state`` is a well-formed saved vCPU ``index``."""
    where = f"vCPU {index}"
    if not isinstance(state, dict) or state.get("index") != index:
        raise StateError(f"{where}: its state is missing or out of order")
    cpuid = state.get("cpuid")
    if not isinstance(cpuid, list) or not cpuid or not all(
            isinstance(r, list) and len(r) == 7 and all(isinstance(x, int) and 0 <= x < 1 << 32 for x in r)
            for r in cpuid):
        raise StateError(f"{where}: cpuid is missing or malformed")
    msrs = state.get("msrs")
    if not isinstance(msrs, list) or not all(
            isinstance(m, list) and len(m) == 2 and all(isinstance(x, int) and 0 <= x < 1 << 64 for x in m)
            for m in msrs):
        raise StateError(f"{where}: msrs is missing or malformed")
    for name in ("regs", "sregs", "lapic", "events", "mp_state"):
        _raw(state, name, _VCPU_STRUCTS[name][2], where)
    if "xsave" not in state and "fpu" not in state:
        raise StateError(f"{where}: neither xsave nor fpu is saved")
    for name in ("xsave", "fpu", "xcrs", "debugregs"):
        if name in state:
            _raw(state, name, _VCPU_STRUCTS[name][2], where)


def restore_vcpu(vcpu, state: dict, structs: tuple[str, ...], tsc_advance: int = 0) -> list[int]:
    """Put saved ``state`` (checked by check_vcpu) into a new vCPU, in the
    order the module docstring gives.  ``tsc_advance``: ticks added to the
    saved TSC.  Returns the MSRs KVM refused (the rest are set)."""
    where = f"vCPU {vcpu.index}"
    for name in ("xcrs", "debugregs", "xsave"):
        if name in state and name not in structs:
            raise StateError(f"{where}: the snapshot has {name} state and this host's KVM cannot "
                             "set it")
    vcpu.set_cpuid(state["cpuid"])
    for name in RESTORE_ORDER:
        if name in state:
            _get, set_, size = _VCPU_STRUCTS[name]
            vcpu.set_raw(set_, _raw(state, name, size, where), f"{where}: KVM_SET_{name.upper()}")
    msrs = [(i, v) for i, v in state["msrs"] if i not in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE)]
    saved = dict((i, v) for i, v in state["msrs"])
    if MSR_IA32_TSC in saved:
        msrs.insert(0, (MSR_IA32_TSC, (saved[MSR_IA32_TSC] + tsc_advance) & ((1 << 64) - 1)))
    if saved.get(MSR_IA32_TSC_DEADLINE):          # 0: disarmed; armed deadlines move with the TSC
        msrs.append((MSR_IA32_TSC_DEADLINE, (saved[MSR_IA32_TSC_DEADLINE] + tsc_advance) & ((1 << 64) - 1)))
    refused = vcpu.set_msrs_partly(msrs)
    for name in ("events", "mp_state"):
        _get, set_, size = _VCPU_STRUCTS[name]
        vcpu.set_raw(set_, _raw(state, name, size, where), f"{where}: KVM_SET_{name.upper()}")
    return refused


# -- the VM: in-kernel irqchip, PIT, kvmclock ----------------------------------------------
def save_vm(vm) -> dict:
    """The in-kernel PIC pair and IOAPIC, the PIT, and kvmclock, with the host's
    wall-clock time they were read at (restore moves the clocks on from it)."""
    state: dict = {}
    for name, chip in IRQCHIPS:
        state[name] = _b64(vm.get_raw(lib.KVM_GET_IRQCHIP, lib.KVMKIT_SIZEOF_IRQCHIP,
                                      f"KVM_GET_IRQCHIP ({name})", chip.to_bytes(4, "little")))
    state["pit2"] = _b64(vm.get_raw(lib.KVM_GET_PIT2, lib.KVMKIT_SIZEOF_PIT2, "KVM_GET_PIT2"))
    clock = vm.get_raw(lib.KVM_GET_CLOCK, lib.KVMKIT_SIZEOF_CLOCK, "KVM_GET_CLOCK")
    state["clock"] = _b64(clock)
    state["realtime_ns"] = time.time_ns()
    return state


def check_vm(state) -> None:
    if not isinstance(state, dict):
        raise StateError("the VM state is missing")
    for name, _chip in IRQCHIPS:
        _raw(state, name, lib.KVMKIT_SIZEOF_IRQCHIP, "irqchip")
    _raw(state, "pit2", lib.KVMKIT_SIZEOF_PIT2, "PIT")
    _raw(state, "clock", lib.KVMKIT_SIZEOF_CLOCK, "kvmclock")
    if not isinstance(state.get("realtime_ns"), int):
        raise StateError("the VM state has no realtime_ns (when it was saved)")


def elapsed_ns(state: dict, now_ns: int | None = None) -> int:
    """Wall-clock nanoseconds since the VM state was saved (0 if the host clock went back)."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    return max(0, now_ns - state["realtime_ns"])


def restore_vm(vm, state: dict, elapsed: int) -> None:
    """Set the irqchip, PIT and kvmclock of a new VM (checked by check_vm);
    kvmclock moves on by ``elapsed`` nanoseconds."""
    for name, chip in IRQCHIPS:
        data = _raw(state, name, lib.KVMKIT_SIZEOF_IRQCHIP, "irqchip")
        if int.from_bytes(data[:4], "little") != chip:
            raise StateError(f"irqchip: {name} holds the state of chip {data[0]}")
        vm.set_raw(lib.KVM_SET_IRQCHIP, data, f"KVM_SET_IRQCHIP ({name})")
    vm.set_raw(lib.KVM_SET_PIT2, _raw(state, "pit2", lib.KVMKIT_SIZEOF_PIT2, "PIT"), "KVM_SET_PIT2")
    clock = bytearray(_raw(state, "clock", lib.KVMKIT_SIZEOF_CLOCK, "kvmclock"))
    value = int.from_bytes(clock[0:8], "little") + elapsed
    clock[0:8] = (value & ((1 << 64) - 1)).to_bytes(8, "little")
    clock[8:12] = bytes(4)                        # flags: a plain value (no realtime/host TSC)
    vm.set_raw(lib.KVM_SET_CLOCK, bytes(clock), "KVM_SET_CLOCK")
