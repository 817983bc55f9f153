"""Put a vCPU into the state Linux's 64-bit boot protocol expects.

CPUID comes from KVM_GET_SUPPORTED_CPUID, adjusted per vCPU (APIC ids and
topology); the boot vCPU gets long mode, identity paging and the boot
registers; every vCPU gets its LAPIC's LINT0/LINT1 wired as ExtINT/NMI.
"""
from __future__ import annotations

CR0_PE, CR0_ET, CR0_NE, CR0_NW, CR0_CD, CR0_PG = 1, 1 << 4, 1 << 5, 1 << 29, 1 << 30, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR = 0x10, 0x18, 0x20

MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102

APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 0x4, 0x7

CPUID_HYPERVISOR_BIT = 1 << 31


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1
TOPOLOGY_LEAVES = (0xB, 0x1F)


def topology_rows(function: int, index: int, count: int) -> list[list[int]]:
    """Leaf 0xB/0x1F: one thread per core, ``count`` cores in one package.
    KVM reports only sub-leaf 0, so all sub-leaves are generated here."""
    shift = max(count - 1, 0).bit_length()
    flags = KVM_CPUID_FLAG_SIGNIFCANT_INDEX
    return [[function, 0, flags, 0, 1, (1 << 8) | 0, index],          # SMT level
            [function, 1, flags, shift, count, (2 << 8) | 1, index],  # core level
            [function, 2, flags, 0, 0, 2, index]]                      # end of levels


def vcpu_cpuid(supported: list[list[int]], index: int, count: int) -> list[list[int]]:
    """The CPUID table of vCPU ``index`` of ``count``: KVM's supported leaves
    with this vCPU's APIC id and a flat one-thread-per-core topology."""
    shift = max(count - 1, 0).bit_length()
    rows = []
    for function, sub, flags, eax, ebx, ecx, edx in supported:
        if function in TOPOLOGY_LEAVES:
            if sub == 0:
                rows.extend(topology_rows(function, index, count))
            continue
        if function == 1:
            ebx = (ebx & 0x0000FFFF) | (index << 24) | (min(count, 255) << 16)
            ecx |= CPUID_HYPERVISOR_BIT
            edx = edx | (1 << 28) if count > 1 else edx & ~(1 << 28)
        elif function == 4:
            # EAX[31:26]: core ids per package - 1; EAX[25:14]: threads per cache - 1 (one)
            if eax & 0x1F:
                eax = (eax & 0x3FFF) | (min((1 << shift) - 1, 63) << 26)
        rows.append([function, sub, flags, eax, ebx, ecx, edx])
    return rows


def boot_msrs() -> dict[int, int]:
    return {
        MSR_IA32_SYSENTER_CS: 0, MSR_IA32_SYSENTER_ESP: 0, MSR_IA32_SYSENTER_EIP: 0,
        MSR_STAR: 0, MSR_CSTAR: 0, MSR_KERNEL_GS_BASE: 0, MSR_SYSCALL_MASK: 0, MSR_LSTAR: 0,
        MSR_IA32_MISC_ENABLE: 1,                           # fast strings
        MSR_MTRR_DEF_TYPE: (1 << 11) | 6,                  # MTRRs on, default write-back
    }


def _segment(seg, selector: int, code: bool) -> None:
    seg.base = 0
    seg.limit = 0xFFFFFFFF
    seg.selector = selector
    seg.type = 0xB if code else 0x3                      # execute/read accessed, read/write accessed
    seg.present, seg.dpl, seg.s, seg.g, seg.avl, seg.unusable = 1, 0, 1, 1, 0, 0
    seg.l = 1 if code else 0
    seg.db = 0 if code else 1


def setup_long_mode(vcpu, boot) -> None:
    """Long mode with the boot loader's GDT and identity page tables."""
    sregs = vcpu.get_sregs()
    _segment(sregs.cs, CODE_SELECTOR, code=True)
    for seg in (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss):
        _segment(seg, DATA_SELECTOR, code=False)
    tr = sregs.tr
    tr.base, tr.limit, tr.selector = 0, 0xFFFFF, TSS_SELECTOR
    tr.type, tr.present, tr.dpl, tr.s, tr.l, tr.db, tr.g, tr.unusable = 0xB, 1, 0, 0, 0, 0, 0, 0
    sregs.gdt.base, sregs.gdt.limit = boot.gdt_base, boot.gdt_limit
    sregs.idt.base, sregs.idt.limit = 0, 0
    sregs.cr3 = boot.cr3
    sregs.cr4 |= CR4_PAE
    sregs.cr0 = (sregs.cr0 | CR0_PE | CR0_ET | CR0_PG) & ~(CR0_CD | CR0_NW)
    sregs.efer |= EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)

    regs = vcpu.get_regs()
    regs.rflags = 2
    regs.rip = boot.entry
    regs.rsi = boot.boot_params
    regs.rsp = regs.rbp = 0x8FF0
    vcpu.set_regs(regs)


def setup_fpu(vcpu) -> None:
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F
    fpu.mxcsr = 0x1F80
    vcpu.set_fpu(fpu)


def setup_lapic(vcpu) -> None:
    regs = vcpu.get_lapic()

    def set_mode(offset: int, mode: int) -> None:
        value = int.from_bytes(regs[offset:offset + 4], "little")
        value = (value & ~0x700) | (mode << 8)
        regs[offset:offset + 4] = value.to_bytes(4, "little")

    set_mode(APIC_LVT_LINT0, APIC_MODE_EXTINT)
    set_mode(APIC_LVT_LINT1, APIC_MODE_NMI)
    vcpu.set_lapic(regs)


def setup_vcpu(vcpu, supported_cpuid, count: int, boot) -> None:
    """Everything a vCPU needs before its first KVM_RUN.  Only the boot vCPU
    (index 0) gets registers; the others wait for the guest's start-up IPI."""
    vcpu.set_cpuid(vcpu_cpuid(supported_cpuid, vcpu.index, count))
    vcpu.set_msrs(boot_msrs())
    setup_fpu(vcpu)
    setup_lapic(vcpu)
    if vcpu.index == 0:
        setup_long_mode(vcpu, boot)
