"""Put a Linux kernel into guest memory for the x86-64 64-bit boot protocol.

:func:`load_linux` loads the kernel (vmlinux ELF, or bzImage), the initrd, the
command line, the zero page, the boot GDT, the identity-mapped page tables and
the MP table, and returns what the vCPU needs: the caller sets long mode
(CR0.PE|PG, CR4.PAE, EFER.LME|LMA), CS = BOOT_CS (0x10), DS/ES/SS = BOOT_DS
(0x18), TR = BOOT_TSS (0x20), CR3 = cr3, RSI = boot_params, RIP = entry.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

from . import bzimage, e820, elf, initrd as initrd_mod, layout, mptable, pagetables, params
from .errors import BootError
from .image import KernelImage, map_file

__all__ = ["BootSetup", "BootError", "load_linux"]

log = logging.getLogger("kvmkit.boot")


class BootSetup(NamedTuple):
    entry: int        # guest-physical 64-bit entry point (the vCPU's RIP)
    boot_params: int  # gpa of the zero page (the vCPU's RSI)
    cr3: int          # gpa of the PML4 of the identity map
    gdt_base: int
    gdt_limit: int
    kernel_start: int
    kernel_end: int


def _read_kernel(path: Path):
    try:
        return map_file(path)
    except FileNotFoundError:
        raise BootError(f"kernel image not found: {path} (check [kernel] image)") from None
    except OSError as exc:
        raise BootError(f"cannot read kernel image {path}: {exc.strerror or exc} (check [kernel] image)") from None


def _load_kernel(mem, path: Path, data: bytes | None) -> KernelImage:
    if data is None:
        data = _read_kernel(path)
    if elf.is_elf(data):
        return elf.load(mem, data, str(path))
    if bzimage.is_bzimage(data):
        return bzimage.load(mem, data, str(path))
    raise BootError(f"{path}: neither an ELF vmlinux nor a bzImage (no ELF magic, no boot flag 0xAA55 at 0x1FE): "
                    f"check [kernel] image")


def load_linux(mem, kernel: Path, initrd: Path | None, cmdline: str, vcpus: int,
               *, acpi_rsdp_addr: int = 0, pci_irqs=(), kernel_data=None) -> BootSetup:
    """Load everything the kernel needs at its 64-bit entry; BootError on any
    bad input.  ``kernel_data``: the image's bytes (or its mapping,
    :func:`~kvmkit.boot.image.map_file`) if the caller has them already
    (``kernel`` then only names it)."""
    if not mem.contains(0, layout.HIGH_MEMORY_START):
        raise BootError(f"memory too small: the boot area alone needs 1 MiB, machine has {mem.size // layout.KIB} KiB")
    mp = mptable.build(vcpus, pci_irqs=pci_irqs)    # checks vcpus before anything is written
    image = _load_kernel(mem, Path(kernel), kernel_data)
    line = params.encode_cmdline(cmdline, image.cmdline_size)
    mem.write(layout.CMDLINE_START, line + bytes(layout.CMDLINE_MAX_SIZE - len(line)))
    rd = None
    if initrd is not None:
        rd = initrd_mod.load(mem, Path(initrd), image.end, image.initrd_addr_max)
    mem.write(layout.SETUP_DATA_START, params.rng_seed_node())
    entries = e820.e820_map(mem.regions)
    mem.write(layout.ZERO_PAGE_START, params.build_zero_page(
        header=image.header, cmdline_addr=layout.CMDLINE_START, initrd=rd,
        e820_table=e820.pack_e820(entries), e820_count=len(entries),
        setup_data=layout.SETUP_DATA_START, code32_start=image.code32_start,
        acpi_rsdp_addr=acpi_rsdp_addr))
    gdt_base, gdt_limit = pagetables.write_gdt(mem)
    cr3 = pagetables.write_identity_map(mem)
    mptable.write(mem, mp)
    log.info("booting %s via %s: entry %#x, kernel %#x-%#x%s, %d vCPU(s)", kernel, image.how, image.entry,
             image.start, image.end, f", initrd {rd[1]} bytes at {rd[0]:#x}" if rd else "", vcpus)
    return BootSetup(entry=image.entry, boot_params=layout.ZERO_PAGE_START, cr3=cr3,
                     gdt_base=gdt_base, gdt_limit=gdt_limit, kernel_start=image.start, kernel_end=image.end)
