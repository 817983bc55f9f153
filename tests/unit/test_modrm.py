from types import SimpleNamespace

import pytest

from kvmkit.hypervisor import host_quirks
from kvmkit.hypervisor.modrm import DecodeError, decode
from kvmkit.memory import GuestMemory

REGS = SimpleNamespace(rax=0x1000, rcx=0x10, rdx=0, rbx=0x2000, rsp=0x8000, rbp=0x9000, rsi=0,
                       rdi=0, r8=0x100, r9=0, r10=0, r11=0, r12=0x3000, r13=0, r14=0, r15=0,
                       rip=0x5000)


@pytest.mark.parametrize("insn,reg,length,address", [
    (b"\x0f\xae\x54\x24\x04", 2, 5, 0x8004),            # ldmxcsr 0x4(%rsp)
    (b"\x0f\xae\x10", 2, 3, 0x1000),                    # ldmxcsr (%rax)
    (b"\x0f\xae\x15\x10\x00\x00\x00", 2, 7, 0x5000 + 7 + 0x10),   # ldmxcsr 0x10(%rip)
    (b"\x0f\xae\x5c\x24\xfc", 3, 5, 0x8000 - 4),        # stmxcsr -0x4(%rsp)
    (b"\x41\x0f\xae\x14\x24", 2, 5, 0x3000),            # ldmxcsr (%r12)
    (b"\x0f\xae\x14\x8b", 2, 4, 0x2000 + 0x10 * 4),     # ldmxcsr (%rbx,%rcx,4)
    (b"\x42\x0f\xae\x14\x05\x00\x10\x00\x00", 2, 9, 0x1000 + 0x100),  # ldmxcsr 0x1000(,%r8)
    (b"\x0f\xae\x95\x00\x01\x00\x00", 2, 7, 0x9100),    # ldmxcsr 0x100(%rbp)
])
def test_decode(insn, reg, length, address):
    op = decode(insn + b"\x90" * 4)
    assert (op.opcode, op.reg, op.length) == (b"\x0f\xae", reg, length)
    assert op.address(REGS) == address


@pytest.mark.parametrize("insn", [b"", b"\x0f", b"\x0f\xae", b"\x0f\xae\xd0", b"\x0f\xae\x54\x24",
                                  b"\x0f\xae\x15\x10\x00"])
def test_decode_rejects_garbage(insn):
    with pytest.raises(DecodeError):
        decode(insn)


class FakeVcpu:
    def __init__(self, regs):
        self.regs = regs
        self.fpu = SimpleNamespace(mxcsr=0x1F80)

    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def get_fpu(self):
        return self.fpu

    def set_fpu(self, fpu):
        self.fpu = fpu

    def translate(self, linear):              # identity map below 1 MiB only
        return linear if linear < (1 << 20) else None


def test_ldmxcsr_assist_loads_from_guest_memory():
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    mem.write_int(0x8004, 4, 0x1FA0)
    vcpu = FakeVcpu(SimpleNamespace(**vars(REGS)))
    assert host_quirks.assist(vcpu, b"\x0f\xae\x54\x24\x04" + bytes(10), mem)
    assert vcpu.fpu.mxcsr == 0x1FA0 and vcpu.regs.rip == 0x5005


def test_stmxcsr_assist_stores_across_a_page_boundary():
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    regs = SimpleNamespace(**vars(REGS))
    regs.rax = 0x1FFE
    vcpu = FakeVcpu(regs)
    vcpu.fpu.mxcsr = 0x12345678 & 0xFFFF
    assert host_quirks.assist(vcpu, b"\x0f\xae\x18" + bytes(10), mem)
    assert mem.read_int(0x1FFE, 4) == 0x5678


def test_mxcsr_assist_refuses_unmapped_or_reserved():
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    regs = SimpleNamespace(**vars(REGS))
    regs.rax = 1 << 40                                  # not mapped
    vcpu = FakeVcpu(regs)
    assert not host_quirks.assist(vcpu, b"\x0f\xae\x10" + bytes(10), mem)
    assert vcpu.regs.rip == 0x5000
    regs.rax = 0x100
    mem.write_int(0x100, 4, 0xFFFF0000)                 # reserved MXCSR bits
    assert not host_quirks.assist(vcpu, b"\x0f\xae\x10" + bytes(10), mem)
