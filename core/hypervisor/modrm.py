"""Decoding the memory operand of a 64-bit x86 instruction (ModRM/SIB).

Just enough to complete the few instructions the nested host's emulator
refuses (see host_quirks): legacy and REX prefixes, a two-byte 0F opcode, and
ModRM with SIB, displacement and RIP-relative addressing.
"""
from __future__ import annotations

from typing import NamedTuple

REGS64 = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
          "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
SEGMENT_PREFIXES = {0x64: "fs", 0x65: "gs"}
IGNORED_PREFIXES = {0x26, 0x2E, 0x36, 0x3E, 0x66, 0x67, 0xF2, 0xF3}


class DecodeError(ValueError):
    pass


class MemOperand(NamedTuple):
    opcode: bytes          # after the prefixes, e.g. b"\x0f\xae"
    reg: int               # ModRM.reg (with REX.R), the /digit for group opcodes
    length: int            # the whole instruction's length in bytes
    segment: str | None    # "fs"/"gs" override, else None
    base: str | None       # register name, "rip", or None
    index: str | None
    scale: int
    disp: int

    def address(self, regs, segment_base: int = 0) -> int:
        """The linear address, given the vCPU's registers (RIP at this instruction)."""
        addr = self.disp + segment_base
        if self.base == "rip":
            addr += regs.rip + self.length
        elif self.base is not None:
            addr += getattr(regs, self.base)
        if self.index is not None:
            addr += getattr(regs, self.index) * self.scale
        return addr & 0xFFFF_FFFF_FFFF_FFFF


def _signed(data: bytes) -> int:
    return int.from_bytes(data, "little", signed=True)


def decode(insn: bytes, opcode_length: int = 2) -> MemOperand:
    """Decode an instruction whose opcode is ``opcode_length`` bytes and which
    has a memory ModRM operand.  Raises DecodeError for anything else."""
    i, segment, rex = 0, None, 0
    while i < len(insn) and (insn[i] in IGNORED_PREFIXES or insn[i] in SEGMENT_PREFIXES):
        segment = SEGMENT_PREFIXES.get(insn[i], segment)
        i += 1
    if i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        rex = insn[i]
        i += 1
    need = i + opcode_length + 1
    if len(insn) < need:
        raise DecodeError("instruction too short")
    opcode = bytes(insn[i:i + opcode_length])
    modrm = insn[i + opcode_length]
    i = need
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    reg |= (rex & 4) << 1
    if mod == 3:
        raise DecodeError("register operand, not memory")
    base: str | None
    index: str | None = None
    scale = 1
    if rm == 4:                                           # SIB follows
        if len(insn) < i + 1:
            raise DecodeError("instruction too short")
        sib = insn[i]
        i += 1
        scale = 1 << (sib >> 6)
        idx = ((sib >> 3) & 7) | ((rex & 2) << 2)
        index = None if idx == 4 else REGS64[idx]
        b = (sib & 7) | ((rex & 1) << 3)
        base = None if (sib & 7) == 5 and mod == 0 else REGS64[b]
        disp_size = 4 if (sib & 7) == 5 and mod == 0 else 0
    elif rm == 5 and mod == 0:
        base, disp_size = "rip", 4
    else:
        base, disp_size = REGS64[rm | ((rex & 1) << 3)], 0
    disp_size = {0: disp_size, 1: 1, 2: 4}[mod]
    if len(insn) < i + disp_size:
        raise DecodeError("instruction too short")
    disp = _signed(insn[i:i + disp_size]) if disp_size else 0
    i += disp_size
    return MemOperand(opcode, reg, i, segment, base, index, scale, disp)
