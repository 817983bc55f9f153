"""KVM system, VM and vCPU file descriptors.

Knows KVM and nothing about devices.  Every ioctl goes through ``_ioctl``,
which turns a negative errno into :class:`KvmError`.
"""
from __future__ import annotations

import errno
import mmap
import os
import struct

from ._kvm import ffi, lib

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12
KVM_GET_TSC_KHZ = 0xAEA3                # _IO(KVMIO, 0xa3)


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed."""


class KvmUnavailable(Exception):
    """/dev/kvm cannot be used (the message says how to fix it)."""


def _ioctl(fd: int, request: int, arg=ffi.NULL, what: str = "") -> int:
    r = lib.kvmkit_ioctl(fd, request, arg)
    if r < 0:
        raise KvmError(-r, f"{what or hex(request)}: {os.strerror(-r)}")
    return r


def _ioctl_val(fd: int, request: int, value: int, what: str = "") -> int:
    r = lib.kvmkit_ioctl_val(fd, request, value)
    if r < 0:
        raise KvmError(-r, f"{what or hex(request)}: {os.strerror(-r)}")
    return r

def _get_raw(fd: int, request: int, size: int, what: str, prefix: bytes = b"") -> bytes:
    """A KVM_GET_* ioctl into ``size`` bytes that start as ``prefix``: the struct's bytes."""
    buf = ffi.new("char[]", size)
    ffi.buffer(buf)[:len(prefix)] = prefix
    _ioctl(fd, request, buf, what)
    return bytes(ffi.buffer(buf))


def _set_raw(fd: int, request: int, data: bytes, what: str) -> None:
    """A KVM_SET_* ioctl from a struct's bytes."""
    _ioctl(fd, request, ffi.new("char[]", bytes(data)), what)


def _tsc_khz(fd: int) -> int | None:
    r = lib.kvmkit_ioctl_val(fd, KVM_GET_TSC_KHZ, 0)
    return r if r > 0 else None


def _msr_buffer(pairs: list[tuple[int, int]]):
    """A struct kvm_msrs holding ``pairs`` of (index, data), and its entries."""
    buf = ffi.new("char[]", lib.KVMKIT_MSRS_HEADER + len(pairs) * ffi.sizeof("struct kvm_msr_entry"))
    ffi.cast("__u32 *", buf)[0] = len(pairs)
    entries = ffi.cast("struct kvm_msr_entry *", buf + lib.KVMKIT_MSRS_HEADER)
    for i, (index, data) in enumerate(pairs):
        entries[i].index = index
        entries[i].data = data
    return buf, entries


class Kvm:
    """The /dev/kvm system file descriptor."""

    def __init__(self, path: str = KVM_PATH):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(
                f"{path} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
                "and enable virtualization in the firmware") from None
        except PermissionError:
            raise KvmUnavailable(
                f"no read/write access to {path}: add yourself to its group "
                f"(sudo usermod -aG kvm $USER, then log in again) or run as root") from None
        version = _ioctl_val(self.fd, lib.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
        if version != KVM_API_VERSION:
            raise KvmUnavailable(f"{path} speaks KVM API {version}, kvmkit needs {KVM_API_VERSION}")
        self.vcpu_mmap_size = _ioctl_val(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0)

    def supported_cpuid(self) -> list[list[int]]:
        """KVM_GET_SUPPORTED_CPUID as [function, index, flags, eax, ebx, ecx, edx] rows."""
        n = 256
        while True:
            buf = ffi.new("char[]", lib.KVMKIT_CPUID2_HEADER + n * ffi.sizeof("struct kvm_cpuid_entry2"))
            ffi.cast("__u32 *", buf)[0] = n
            r = lib.kvmkit_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if r == -errno.E2BIG:
                n *= 2
                continue
            if r < 0:
                raise KvmError(-r, "KVM_GET_SUPPORTED_CPUID: " + os.strerror(-r))
            count = ffi.cast("__u32 *", buf)[0]
            entries = ffi.cast("struct kvm_cpuid_entry2 *", buf + lib.KVMKIT_CPUID2_HEADER)
            return [[e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx]
                    for e in (entries[i] for i in range(count))]

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a vCPU."""
        n = 512
        while True:
            buf = ffi.new("char[]", lib.KVMKIT_MSR_LIST_HEADER + 4 * n)
            ffi.cast("__u32 *", buf)[0] = n
            r = lib.kvmkit_ioctl(self.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
            if r == -errno.E2BIG:
                n = max(n * 2, ffi.cast("__u32 *", buf)[0])
                continue
            if r < 0:
                raise KvmError(-r, "KVM_GET_MSR_INDEX_LIST: " + os.strerror(-r))
            count = ffi.cast("__u32 *", buf)[0]
            return list(ffi.cast("__u32 *", buf + lib.KVMKIT_MSR_LIST_HEADER)[0:count])

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 when the capability is missing."""
        r = lib.kvmkit_ioctl_val(self.fd, lib.KVM_CHECK_EXTENSION, cap)
        return max(r, 0)

    def create_vm(self) -> "Vm":
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        return Vm(self, fd)

    def close(self) -> None:
        os.close(self.fd)


class Vm:
    """A VM file descriptor: memory slots, interrupt controllers, vCPUs."""

    def __init__(self, kvm: Kvm, fd: int):
        self.kvm = kvm
        self.fd = fd
        self._slots: list = []

    def map_memory(self, memory) -> None:
        """Register every region of a GuestMemory as a memory slot."""
        base = ffi.from_buffer(memory.host_buffer())
        self._slots.append(base)
        for slot, r in enumerate(memory.regions):
            region = ffi.new("struct kvm_userspace_memory_region *", {
                "slot": slot, "flags": 0, "guest_phys_addr": r.gpa, "memory_size": r.size,
                "userspace_addr": int(ffi.cast("uintptr_t", base)) + r.offset})
            _ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def map_extra(self, slot: int, gpa: int, buffer) -> None:
        """Map a page-aligned host buffer (kept alive here) at ``gpa`` as memory slot ``slot``."""
        base = ffi.from_buffer(buffer)
        self._slots.append(base)
        region = ffi.new("struct kvm_userspace_memory_region *", {
            "slot": slot, "flags": 0, "guest_phys_addr": gpa, "memory_size": len(buffer),
            "userspace_addr": int(ffi.cast("uintptr_t", base))})
        _ioctl(self.fd, lib.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def set_tss_addr(self, addr: int) -> None:
        _ioctl_val(self.fd, lib.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        value = ffi.new("__u64 *", addr)
        _ioctl(self.fd, lib.KVM_SET_IDENTITY_MAP_ADDR, value, "KVM_SET_IDENTITY_MAP_ADDR")

    def create_irqchip(self) -> None:
        _ioctl(self.fd, lib.KVM_CREATE_IRQCHIP, ffi.NULL, "KVM_CREATE_IRQCHIP")

    def create_pit2(self) -> None:
        cfg = ffi.new("struct kvm_pit_config *", {"flags": lib.KVM_PIT_SPEAKER_DUMMY})
        _ioctl(self.fd, lib.KVM_CREATE_PIT2, cfg, "KVM_CREATE_PIT2")

    def irq_line(self, gsi: int, level: int) -> None:
        # struct kvm_irq_level { union { __u32 irq; __s32 status; }; __u32 level; }
        buf = ffi.new("__u32[2]", [gsi, level])
        _ioctl(self.fd, lib.KVM_IRQ_LINE, buf, "KVM_IRQ_LINE")

    def ioeventfd(self, fd: int, addr: int, length: int, *, pio: bool = False,
                  datamatch: int | None = None, deassign: bool = False) -> None:
        """Make guest writes of ``length`` bytes to ``addr`` signal eventfd ``fd``."""
        flags = (lib.KVM_IOEVENTFD_FLAG_PIO if pio else 0) \
            | (lib.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0) \
            | (lib.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
        arg = ffi.new("struct kvm_ioeventfd *", {"datamatch": datamatch or 0, "addr": addr,
                                                  "len": length, "fd": fd, "flags": flags})
        _ioctl(self.fd, lib.KVM_IOEVENTFD, arg, "KVM_IOEVENTFD")

    def irqfd(self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False) -> None:
        """Make a write to eventfd ``fd`` raise ``gsi`` (with a resample fd: level-triggered)."""
        flags = (lib.KVM_IRQFD_FLAG_RESAMPLE if resample_fd is not None else 0) \
            | (lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0)
        arg = ffi.new("struct kvm_irqfd *", {"fd": fd, "gsi": gsi, "flags": flags,
                                              "resamplefd": resample_fd or 0})
        _ioctl(self.fd, lib.KVM_IRQFD, arg, "KVM_IRQFD")

    def set_gsi_routing(self, routes: list[tuple]) -> None:
        """Replace the GSI routing table.  Each route is ("irqchip", gsi, chip, pin)
        or ("msi", gsi, address, data)."""
        size = lib.KVMKIT_ROUTING_ENTRY_SIZE
        buf = ffi.new("char[]", lib.KVMKIT_ROUTING_HEADER + len(routes) * size)
        raw = ffi.buffer(buf)
        struct.pack_into("<II", raw, 0, len(routes), 0)
        for i, route in enumerate(routes):
            at = lib.KVMKIT_ROUTING_HEADER + i * size
            u = at + lib.KVMKIT_ROUTING_ENTRY_U_OFFSET
            if route[0] == "irqchip":
                _, gsi, chip, pin = route
                struct.pack_into("<IIII", raw, at, gsi, lib.KVM_IRQ_ROUTING_IRQCHIP, 0, 0)
                struct.pack_into("<II", raw, u, chip, pin)
            else:
                _, gsi, address, data = route
                struct.pack_into("<IIII", raw, at, gsi, lib.KVM_IRQ_ROUTING_MSI, 0, 0)
                struct.pack_into("<III", raw, u, address & 0xFFFFFFFF, address >> 32, data)
        _ioctl(self.fd, lib.KVM_SET_GSI_ROUTING, buf, "KVM_SET_GSI_ROUTING")

    def get_raw(self, request: int, size: int, what: str, prefix: bytes = b"") -> bytes:
        """A KVM_GET_* ioctl of the VM into ``size`` bytes (which start with
        ``prefix``, e.g. the chip id of KVM_GET_IRQCHIP); the struct's bytes."""
        return _get_raw(self.fd, request, size, what, prefix)

    def set_raw(self, request: int, data: bytes, what: str) -> None:
        _set_raw(self.fd, request, data, what)

    def tsc_khz(self) -> int | None:
        """The vCPUs' TSC rate in kHz (KVM_GET_TSC_KHZ on the VM, Linux 6.0+), or None."""
        return _tsc_khz(self.fd)

    def create_vcpu(self, index: int) -> "Vcpu":
        fd = _ioctl_val(self.fd, lib.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        return Vcpu(self, fd, index)

    def close(self) -> None:
        os.close(self.fd)
        self._slots.clear()


class Vcpu:
    """A vCPU file descriptor and its shared ``kvm_run`` page."""

    def __init__(self, vm: Vm, fd: int, index: int):
        self.vm = vm
        self.fd = fd
        self.index = index
        self.run_map = mmap.mmap(fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_buf = memoryview(self.run_map)
        base = ffi.from_buffer(self.run_map)
        self._base = base
        self.run = ffi.cast("struct kvm_run *", base)
        union = base + lib.KVMKIT_EXIT_UNION_OFFSET
        self.io = ffi.cast("struct kvmkit_io *", union)
        self.mmio = ffi.cast("struct kvmkit_mmio *", union)
        self.internal = ffi.cast("struct kvmkit_internal *", union)
        self.system_event = ffi.cast("struct kvmkit_system_event *", union)
        self.fail_entry = ffi.cast("struct kvmkit_fail_entry *", union)
        self.mmio_data = self.run_buf[lib.KVMKIT_EXIT_UNION_OFFSET + 8:lib.KVMKIT_EXIT_UNION_OFFSET + 16]
        # kvm_run.s.regs.regs: valid after each exit once enable_sync_regs() succeeded
        self.sync_regs = ffi.cast("struct kvm_regs *", base + lib.KVMKIT_SYNC_REGS_OFFSET)
        self.regs_synced = False
        self.cpuid: list[list[int]] = []

    def enable_sync_regs(self) -> bool:
        """Have KVM copy the general registers into kvm_run on every exit
        (KVM_CAP_SYNC_REGS), so the exit's RIP costs no ioctl.  False if unsupported."""
        if not self.vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & lib.KVM_SYNC_X86_REGS:
            return False
        self.run.kvm_valid_regs = lib.KVM_SYNC_X86_REGS
        self.regs_synced = True
        return True

    # -- running ---------------------------------------------------------------
    def run_once(self) -> int:
        """One KVM_RUN: 0 on an exit to handle, else -errno (EINTR, EAGAIN)."""
        r = lib.kvmkit_ioctl_val(self.fd, lib.KVM_RUN, 0)
        return r if r < 0 else 0

    def complete_pending(self) -> None:
        """Finish the last exit's emulation without entering the guest (an IN's
        value into RAX, RIP past an OUT or MMIO access): KVM_RUN with
        immediate_exit set does that and returns EINTR.  Saved state is only
        whole after this; a restored vCPU would otherwise repeat the access."""
        self.run.immediate_exit = 1
        r = self.run_once()
        if r not in (0, -errno.EINTR, -errno.EAGAIN):
            raise KvmError(-r, f"vCPU {self.index}: KVM_RUN (completing the last exit): {os.strerror(-r)}")

    # -- state -----------------------------------------------------------------
    def get_regs(self):
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self.fd, lib.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs) -> None:
        _ioctl(self.fd, lib.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self):
        sregs = ffi.new("struct kvm_sregs *")
        _ioctl(self.fd, lib.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs) -> None:
        _ioctl(self.fd, lib.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_fpu(self):
        fpu = ffi.new("struct kvm_fpu *")
        _ioctl(self.fd, lib.KVM_GET_FPU, fpu, "KVM_GET_FPU")
        return fpu

    def set_fpu(self, fpu) -> None:
        _ioctl(self.fd, lib.KVM_SET_FPU, fpu, "KVM_SET_FPU")

    def get_raw(self, request: int, size: int, what: str) -> bytes:
        """A KVM_GET_* ioctl of this vCPU into ``size`` bytes: the struct's bytes."""
        return _get_raw(self.fd, request, size, what)

    def set_raw(self, request: int, data: bytes, what: str) -> None:
        _set_raw(self.fd, request, data, what)

    def tsc_khz(self) -> int | None:
        """This vCPU's TSC rate in kHz (KVM_GET_TSC_KHZ), or None."""
        return _tsc_khz(self.fd)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS for ``indices``; an MSR KVM cannot read is left out
        (KVM stops a batch at the first one it cannot read: the rest are read again)."""
        values: dict[int, int] = {}
        todo = list(indices)
        while todo:
            buf, entries = _msr_buffer([(index, 0) for index in todo])
            done = _ioctl(self.fd, lib.KVM_GET_MSRS, buf, "KVM_GET_MSRS")
            for i in range(done):
                values[entries[i].index] = entries[i].data
            todo = todo[done + 1:]              # skip the one that failed
        return values

    def set_msrs_partly(self, msrs: list[tuple[int, int]]) -> list[int]:
        """KVM_SET_MSRS in order; an MSR KVM refuses is skipped and the rest
        are set.  Returns the refused indices."""
        refused: list[int] = []
        todo = list(msrs)
        while todo:
            buf, _entries = _msr_buffer(todo)
            done = _ioctl(self.fd, lib.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
            if done < len(todo):
                refused.append(todo[done][0])
            todo = todo[done + 1:]
        return refused

    def set_cpuid(self, rows: list[list[int]]) -> None:
        size = ffi.sizeof("struct kvm_cpuid_entry2")
        buf = ffi.new("char[]", lib.KVMKIT_CPUID2_HEADER + len(rows) * size)
        ffi.cast("__u32 *", buf)[0] = len(rows)
        entries = ffi.cast("struct kvm_cpuid_entry2 *", buf + lib.KVMKIT_CPUID2_HEADER)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(rows):
            e = entries[i]
            e.function, e.index, e.flags = function, index, flags
            e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
        _ioctl(self.fd, lib.KVM_SET_CPUID2, buf, "KVM_SET_CPUID2")
        self.cpuid = [list(row) for row in rows]      # what a snapshot records

    def set_msrs(self, msrs: dict[int, int]) -> None:
        buf, _entries = _msr_buffer(list(msrs.items()))
        done = _ioctl(self.fd, lib.KVM_SET_MSRS, buf, "KVM_SET_MSRS")
        if done != len(msrs):
            bad = list(msrs)[done]
            raise KvmError(errno.EINVAL, f"KVM_SET_MSRS: MSR {bad:#x} was refused")

    def get_lapic(self) -> bytearray:
        state = ffi.new("struct kvm_lapic_state *")
        _ioctl(self.fd, lib.KVM_GET_LAPIC, state, "KVM_GET_LAPIC")
        return bytearray(ffi.buffer(state))

    def set_lapic(self, regs: bytearray) -> None:
        state = ffi.new("struct kvm_lapic_state *")
        ffi.buffer(state)[:] = bytes(regs)
        _ioctl(self.fd, lib.KVM_SET_LAPIC, state, "KVM_SET_LAPIC")

    def inject_exception(self, vector: int) -> None:
        """Queue a hardware exception without an error code (KVM_SET_VCPU_EVENTS)."""
        buf = ffi.new("char[]", lib.KVMKIT_EVENTS_SIZE)
        _ioctl(self.fd, lib.KVM_GET_VCPU_EVENTS, buf, "KVM_GET_VCPU_EVENTS")
        exc = lib.KVMKIT_EVENTS_EXCEPTION_OFFSET
        # struct { __u8 injected, nr, has_error_code, pending; __u32 error_code; } exception
        buf[exc:exc + 8] = struct.pack("<BBBBI", 1, vector, 0, 0, 0)
        ffi.cast("__u32 *", buf + lib.KVMKIT_EVENTS_FLAGS_OFFSET)[0] = 0
        _ioctl(self.fd, lib.KVM_SET_VCPU_EVENTS, buf, "KVM_SET_VCPU_EVENTS")

    def get_mp_state(self) -> int:
        state = ffi.new("struct kvm_mp_state *")
        _ioctl(self.fd, lib.KVM_GET_MP_STATE, state, "KVM_GET_MP_STATE")
        return state.mp_state

    def translate(self, linear: int) -> int | None:
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear})
        _ioctl(self.fd, lib.KVM_TRANSLATE, tr, "KVM_TRANSLATE")
        return tr.physical_address if tr.valid else None

    def close(self) -> None:
        self.mmio_data.release()
        self.run_buf.release()
        # cffi still references the mapping through self._base; drop it first
        self.run = self.io = self.mmio = self.internal = self.system_event = None
        self.fail_entry = self._base = self.sync_regs = None
        try:
            self.run_map.close()
        except BufferError:
            pass
        os.close(self.fd)
