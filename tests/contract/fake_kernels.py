"""Minimal kernel files that pass kvmkit's header checks (not bootable)."""
import struct


def elf_kernel(path, entry=0x1000000, size=0x2000):
    """A minimal x86-64 ELF vmlinux: one PT_LOAD segment."""
    ehdr = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), 2, 62, 1, entry,
                       64, 0, 0, 64, 56, 1, 64, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, entry, entry, size - 0x1000, size - 0x1000, 0x1000)
    path.write_bytes((ehdr + phdr).ljust(size, b"\0"))
    return path


def bzimage_kernel(path, version=0x020F):
    data = bytearray(4096)
    data[0x1F1] = 1                                 # one setup sector after the boot sector
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x201] = 0x66                              # header ends at 0x268
    data[0x202:0x206] = b"HdrS"
    data[0x206:0x208] = version.to_bytes(2, "little")
    path.write_bytes(bytes(data))
    return path
