"""Load a Linux vmlinux (ELF64, x86-64, ET_EXEC) at its physical addresses."""
from __future__ import annotations

import struct
from typing import NamedTuple

from ..memory import PCI_HOLE_START
from . import layout
from .errors import BootError
from .image import KernelImage

ELF_MAGIC = b"\x7fELF"
_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")   # 64 bytes
_PHDR = struct.Struct("<IIQQQQQQ")           # 56 bytes
ELFCLASS64 = 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_X86_64 = 62
PT_LOAD = 1


class Segment(NamedTuple):
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int

    @property
    def end(self) -> int:
        return self.paddr + self.memsz


def is_elf(data: bytes) -> bool:
    return data[:4] == ELF_MAGIC


def _mib(n: int) -> int:
    return -(-n // layout.MIB)


def parse(data: bytes, name: str) -> tuple[int, list[Segment]]:
    """Check the ELF header and return (e_entry, PT_LOAD segments with memsz > 0)."""
    if len(data) < _EHDR.size or not is_elf(data):
        raise BootError(f"{name}: not an ELF file (bad magic or shorter than an ELF header)")
    (ident, e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize,
     e_phentsize, e_phnum, _shentsize, _shnum, _shstrndx) = _EHDR.unpack_from(data)
    if ident[4] != ELFCLASS64:
        raise BootError(f"{name}: ELF class {ident[4]} is not ELF64: use a 64-bit x86 kernel")
    if ident[5] != ELFDATA2LSB:
        raise BootError(f"{name}: ELF is not little-endian: use an x86-64 kernel")
    if e_machine != EM_X86_64:
        raise BootError(f"{name}: ELF machine {e_machine} is not x86-64 (62): use an x86-64 kernel")
    if e_type != ET_EXEC:
        raise BootError(f"{name}: ELF type {e_type} is not ET_EXEC (2): boot a vmlinux, not an object or shared library")
    if e_phnum == 0 or e_phentsize < _PHDR.size:
        raise BootError(f"{name}: ELF has no usable program headers (phnum {e_phnum}, phentsize {e_phentsize})")
    if e_phoff + e_phnum * e_phentsize > len(data):
        raise BootError(f"{name}: ELF program headers run past the end of the file (truncated?)")
    segments = []
    for i in range(e_phnum):
        p_type, _fl, off, vaddr, paddr, filesz, memsz, _al = _PHDR.unpack_from(data, e_phoff + i * e_phentsize)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise BootError(f"{name}: ELF segment {i} has a file size larger than its memory size (corrupt)")
        if off + filesz > len(data):
            raise BootError(f"{name}: ELF segment {i} runs past the end of the file (truncated?)")
        segments.append(Segment(off, vaddr, paddr, filesz, memsz))
    if not segments:
        raise BootError(f"{name}: ELF has no loadable (PT_LOAD) segment")
    return e_entry, segments


def _check_placement(mem, segments: list[Segment], name: str) -> None:
    need = max(s.end for s in segments)
    for s in segments:
        if s.paddr < layout.HIGH_MEMORY_START:
            raise BootError(f"{name}: ELF segment at {s.paddr:#x} overlaps the boot area below 1 MiB: "
                            f"link the kernel at a physical address >= 0x100000")
        if mem.contains(s.paddr, s.memsz):
            continue
        if mem.ram_end_below_4g < need <= PCI_HOLE_START:
            raise BootError(f"{name}: memory too small for the kernel: needs {_mib(need)} MiB, "
                            f"machine has {mem.size // layout.MIB}: give the machine more memory")
        ram = ", ".join(f"{r.gpa:#x}-{r.end:#x}" for r in mem.regions)
        raise BootError(f"{name}: ELF segment {s.paddr:#x}-{s.end:#x} lies outside guest RAM ({ram})")


def _physical_entry(e_entry: int, segments: list[Segment], name: str) -> int:
    for s in segments:
        if s.paddr <= e_entry < s.end:
            return e_entry
    for s in segments:
        if s.vaddr <= e_entry < s.vaddr + s.memsz:
            return s.paddr + (e_entry - s.vaddr)
    raise BootError(f"{name}: ELF entry point {e_entry:#x} is not inside any loadable segment (corrupt)")


def load(mem, data: bytes, name: str, how: str = "vmlinux ELF") -> KernelImage:
    """Validate every segment, then copy them into ``mem``; nothing is written on error."""
    e_entry, segments = parse(data, name)
    _check_placement(mem, segments, name)
    entry = _physical_entry(e_entry, segments, name)
    if entry >= layout.IDENTITY_MAP_END:
        raise BootError(f"{name}: entry point {entry:#x} is above 4 GiB, outside the boot identity map")
    view = memoryview(data)
    for s in segments:
        mem.write(s.paddr, view[s.offset:s.offset + s.filesz])
        if s.memsz > s.filesz:
            mem.zero(s.paddr + s.filesz, s.memsz - s.filesz)
    return KernelImage(entry=entry, start=min(s.paddr for s in segments),
                       end=max(s.end for s in segments), how=how)
