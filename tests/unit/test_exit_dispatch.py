"""The vCPU exit dispatcher, driven with made-up exits (no KVM)."""
import struct
import threading
from types import SimpleNamespace

import pytest

from kvmkit.bus import Bus, DeviceFault
from kvmkit.hypervisor._kvm import ffi, lib
from kvmkit.memory import GuestMemory
from kvmkit.vcpu import EXIT_ERROR, EXIT_OK, handle_exit, handle_io


class Port:
    def __init__(self):
        self.written = []
        self.next = 0x41

    def read(self, offset, size):
        v = self.next
        self.next += 1
        return v

    def write(self, offset, size, value):
        self.written.append((offset, size, value))


def buses():
    pio, mmio = Bus("pio"), Bus("mmio")
    port = Port()
    pio.add(0x3F8, 8, port, threading.RLock(), "uart")
    mem = Port()
    mmio.add(0xD000_0000, 0x1000, mem, threading.RLock(), "mmio-dev")
    return pio, mmio, port, mem


def fake_vcpu(reason, **views):
    """A vCPU whose kvm_run page (run_buf) holds the exit as KVM lays it out:
    exit_reason, and the io or mmio view's fields in the exit union."""
    run_buf = memoryview(bytearray(8192))
    struct.pack_into("<I", run_buf, ffi.offsetof("struct kvm_run", "exit_reason"), reason)
    union = lib.KVMKIT_EXIT_UNION_OFFSET
    io, m = views.get("io"), views.get("mmio")
    if io is not None:
        struct.pack_into("<BBHIQ", run_buf, union, io.direction, io.size, io.port, io.count,
                         io.data_offset)
    if m is not None:
        struct.pack_into("<Q8xIB", run_buf, union, m.phys_addr, m.len, m.is_write)
    return SimpleNamespace(index=0, run=SimpleNamespace(exit_reason=reason), run_buf=run_buf,
                           mmio_data=run_buf[union + 8:union + 16], **views)


def test_port_out():
    pio, mmio, port, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_OUT, size=1,
                                                      port=0x3F8, count=1, data_offset=512))
    v.run_buf[512] = ord("x")
    assert handle_exit(v, pio, mmio) is None
    assert port.written == [(0, 1, ord("x"))]


def test_port_out_and_in_of_four_bytes_are_little_endian():
    pio, mmio, port, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_OUT, size=4,
                                                      port=0x3FC, count=1, data_offset=4096))
    v.run_buf[4096:4100] = b"\x01\x02\x03\x04"
    assert handle_exit(v, pio, mmio) is None
    assert port.written == [(4, 4, 0x04030201)]
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_IN, size=2,
                                                      port=0x3F8, count=1, data_offset=4096))
    assert handle_exit(v, pio, mmio) is None
    assert bytes(v.run_buf[4096:4098]) == b"\x41\x00"


@pytest.mark.parametrize("offset", [8190, 8192, 1 << 40])
def test_a_data_offset_past_the_page_is_refused(offset):
    pio, mmio, port, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_IN, size=4,
                                                      port=0x3F8, count=1, data_offset=offset))
    with pytest.raises(ValueError, match="malformed port I/O exit"):
        handle_exit(v, pio, mmio)
    assert port.next == 0x41                   # the device was never read


def test_string_port_in_repeats_into_the_data_area():
    pio, mmio, port, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_IN, size=1,
                                                      port=0x3F8, count=3, data_offset=1024))
    assert handle_exit(v, pio, mmio) is None
    assert bytes(v.run_buf[1024:1027]) == b"ABC"


def test_unclaimed_port_in_reads_all_ones():
    pio, mmio, _, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_IN, size=2,
                                                      port=0x80, count=1, data_offset=100))
    handle_exit(v, pio, mmio)
    assert bytes(v.run_buf[100:102]) == b"\xff\xff"


def test_mmio_read_and_write():
    pio, mmio, _, dev = buses()
    v = fake_vcpu(lib.KVM_EXIT_MMIO, mmio=SimpleNamespace(phys_addr=0xD000_0010, len=4, is_write=0))
    handle_exit(v, pio, mmio)
    assert int.from_bytes(v.mmio_data[:4], "little") == 0x41
    v = fake_vcpu(lib.KVM_EXIT_MMIO, mmio=SimpleNamespace(phys_addr=0xD000_0020, len=8, is_write=1))
    v.mmio_data[:] = struct.pack("<Q", 0x1122334455667788)
    handle_exit(v, pio, mmio)
    assert dev.written == [(0x20, 8, 0x1122334455667788)]


@pytest.mark.parametrize("size,count", [(3, 1), (1, 5000), (0, 1)])
def test_malformed_io_exits_raise_instead_of_touching_memory(size, count):
    pio, _, _, _ = buses()
    with pytest.raises(ValueError):
        handle_io(pio, 0x3F8, size, count, False, memoryview(bytearray(4096))[100:200])


def test_triple_fault_is_a_clean_reset():
    pio, mmio, _, _ = buses()
    stop = handle_exit(fake_vcpu(lib.KVM_EXIT_SHUTDOWN), pio, mmio)
    assert stop.code == EXIT_OK and "triple fault" in stop.reason


@pytest.mark.parametrize("event,code", [(lib.KVM_SYSTEM_EVENT_RESET, EXIT_OK),
                                        (lib.KVM_SYSTEM_EVENT_SHUTDOWN, EXIT_OK),
                                        (lib.KVM_SYSTEM_EVENT_CRASH, EXIT_ERROR)])
def test_system_events(event, code):
    pio, mmio, _, _ = buses()
    v = fake_vcpu(lib.KVM_EXIT_SYSTEM_EVENT, system_event=SimpleNamespace(type=event))
    assert handle_exit(v, pio, mmio).code == code


def emulation_failure(insn: bytes):
    raw = struct.pack("<Q", 1) + bytes([len(insn)]) + insn
    raw = raw.ljust(128, b"\0")
    data = list(struct.unpack("<16Q", raw))
    return SimpleNamespace(suberror=lib.KVM_INTERNAL_ERROR_EMULATION, ndata=4, data=data)


class RegsVcpu(SimpleNamespace):
    def get_regs(self):
        return self.regs

    def set_regs(self, regs):
        self.regs = regs

    def inject_exception(self, vector):
        self.injected.append(vector)


def quirk_vcpu(insn):
    v = fake_vcpu(lib.KVM_EXIT_INTERNAL_ERROR, internal=emulation_failure(insn))
    return RegsVcpu(**vars(v), regs=SimpleNamespace(rip=0x1000), injected=[])


def test_int3_assist_advances_rip_and_injects_breakpoint():
    pio, mmio, _, _ = buses()
    v = quirk_vcpu(b"\xcc")
    assert handle_exit(v, pio, mmio, quirks=True) is None
    assert v.regs.rip == 0x1001 and v.injected == [3]


def test_fwait_assist_skips_the_instruction():
    pio, mmio, _, _ = buses()
    v = quirk_vcpu(b"\x9b")
    assert handle_exit(v, pio, mmio, quirks=True) is None
    assert v.regs.rip == 0x1001 and v.injected == []


def test_emulation_failure_without_quirks_stops_and_names_the_bytes():
    """quirks=False: nothing is assisted, though guest memory is there for the
    assists that need it (ldmxcsr reads its operand from it)."""
    pio, mmio, _, _ = buses()
    memory = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    for insn in (b"\xcc", b"\x9b", b"\x0f\xae\x10"):
        v = quirk_vcpu(insn)
        stop = handle_exit(v, pio, mmio, quirks=False, memory=memory)
        assert stop.code == EXIT_ERROR and insn.hex(" ") in stop.reason
        assert v.regs.rip == 0x1000 and v.injected == []


def test_emulation_failure_no_assist_knows_stops_with_quirks():
    pio, mmio, _, _ = buses()
    memory = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    v = quirk_vcpu(b"\x48\x0f\xc7\x0e")                 # lock-less cmpxchg16b: no assist
    stop = handle_exit(v, pio, mmio, quirks=True, memory=memory)
    assert stop.code == EXIT_ERROR and "48 0f c7 0e" in stop.reason
    assert v.regs.rip == 0x1000 and v.injected == []


def test_unknown_exit_stops_with_an_error():
    pio, mmio, _, _ = buses()
    stop = handle_exit(fake_vcpu(lib.KVM_EXIT_HYPERCALL), pio, mmio)
    assert stop.code == EXIT_ERROR and "hypercall" in stop.reason


def test_device_fault_propagates_with_its_name():
    pio, mmio = Bus("pio"), Bus("mmio")

    class Broken:
        def read(self, o, s):
            raise KeyError("x")

        def write(self, o, s, v):
            raise KeyError("x")

    pio.add(0x60, 1, Broken(), threading.RLock(), "i8042.0")
    v = fake_vcpu(lib.KVM_EXIT_IO, io=SimpleNamespace(direction=lib.KVM_EXIT_IO_IN, size=1,
                                                      port=0x60, count=1, data_offset=0))
    with pytest.raises(DeviceFault, match="i8042.0"):
        handle_exit(v, pio, mmio)
