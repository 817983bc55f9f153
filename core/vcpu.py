"""vCPU threads and the exit dispatcher.

``handle_exit`` is a pure function of a vCPU's exit state and the buses: it
reads what ``kvm_run`` says, performs the I/O, and returns ``None`` to keep
running or a :class:`Stop`.  Tests drive it with made-up exits.
"""
from __future__ import annotations

import collections
import errno
import logging
import os
import signal
import struct
import threading
import time

from . import endings
from .endings import Stop
from .hypervisor import host_quirks
from .hypervisor._kvm import ffi, lib

log = logging.getLogger("kvmkit.vcpu")

from .plugin_api import EXIT_ERROR, EXIT_OK

EXIT_NAMES = {getattr(lib, n): n[len("KVM_EXIT_"):].lower() for n in dir(lib)
              if n.startswith("KVM_EXIT_") and n not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


# kvm_run as the exit path reads it: exit_reason (u32), and in the exit union
# KVM_EXIT_IO's direction (u8), size (u8), port (u16), count (u32) and
# data_offset (u64), or KVM_EXIT_MMIO's phys_addr (u64), data[8], len (u32)
# and is_write (u8).
_REASON_AT = ffi.offsetof("struct kvm_run", "exit_reason")
_UNION_AT = lib.KVMKIT_EXIT_UNION_OFFSET
_IO_EXIT = struct.Struct(f"<I{_UNION_AT - _REASON_AT - 4}xBBHIQ")
_MMIO_EXIT = struct.Struct("<Q8xIB")
_VALUE = {1: struct.Struct("<B"), 2: struct.Struct("<H"), 4: struct.Struct("<I")}
_EXIT_IO, _EXIT_MMIO, _IO_OUT = lib.KVM_EXIT_IO, lib.KVM_EXIT_MMIO, lib.KVM_EXIT_IO_OUT


def handle_io(bus, port: int, size: int, count: int, is_out: bool, data: memoryview) -> None:
    """A port-I/O exit: ``count`` accesses of ``size`` bytes (string I/O repeats)."""
    if size not in (1, 2, 4) or count * size > len(data):
        raise ValueError(f"malformed port I/O exit (size {size}, count {count})")
    for i in range(count):
        chunk = data[i * size:(i + 1) * size]
        if is_out:
            bus.write(port, size, int.from_bytes(chunk, "little"))
        else:
            chunk[:] = bus.read(port, size).to_bytes(size, "little")


def handle_mmio(bus, addr: int, length: int, is_write: bool, data: memoryview) -> None:
    if length not in (1, 2, 4, 8):
        raise ValueError(f"malformed MMIO exit (length {length})")
    if is_write:
        bus.write(addr, length, int.from_bytes(data[:length], "little"))
    else:
        data[:length] = bus.read(addr, length).to_bytes(length, "little")


def handle_exit(vcpu, pio, mmio, quirks: bool = False, memory=None,
                streak: endings.FailureStreak | None = None) -> Stop | None:
    """Handle the exit that ``vcpu.run_buf`` (the mapped ``kvm_run``) describes.

    Port I/O and MMIO, nearly every exit, are decoded with one ``unpack_from``
    of the fields they need; a single port access goes straight to the bus.
    The rarer exits read the exit-union views (``vcpu.system_event`` ...).
    ``memory`` lets an emulation failure be checked for code run from outside
    guest memory; ``streak`` (the vCPU's) catches a storm of assisted failures."""
    buf = vcpu.run_buf
    reason, direction, size, port, count, off = _IO_EXIT.unpack_from(buf, _REASON_AT)
    if reason == _EXIT_IO:
        value = _VALUE.get(size) if count == 1 else None
        if value is not None and off + size <= len(buf):      # one access of 1, 2 or 4 bytes
            if direction == _IO_OUT:
                pio.write(port, size, value.unpack_from(buf, off)[0])
            else:
                value.pack_into(buf, off, pio.read(port, size))
            return None
        handle_io(pio, port, size, count, direction == _IO_OUT, buf[off:off + size * count])
        return None
    if reason == _EXIT_MMIO:
        addr, length, is_write = _MMIO_EXIT.unpack_from(buf, _UNION_AT)
        handle_mmio(mmio, addr, length, bool(is_write), vcpu.mmio_data)
        return None
    if reason in (lib.KVM_EXIT_INTR, lib.KVM_EXIT_IRQ_WINDOW_OPEN):
        return None
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return Stop("guest reset (triple fault)", EXIT_OK)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        kind = vcpu.system_event.type
        if kind == lib.KVM_SYSTEM_EVENT_RESET:
            return Stop("guest reset", EXIT_OK)
        if kind == lib.KVM_SYSTEM_EVENT_SHUTDOWN:
            return Stop("guest power-off", EXIT_OK)
        return Stop(f"guest system event {kind}", EXIT_ERROR)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        internal = vcpu.internal
        raw = bytes(b for word in list(internal.data)[:4] for b in int(word).to_bytes(8, "little"))
        if internal.suberror == lib.KVM_INTERNAL_ERROR_EMULATION:
            insn = host_quirks.emulation_failure_insn(raw)
            if not insn and memory is not None:
                stop = endings.fetch_from_nowhere(vcpu, memory)
                if stop is not None:
                    return stop
            if quirks:
                rip = vcpu.get_regs().rip
                if host_quirks.assist(vcpu, insn, memory):
                    return endings.assisted(vcpu, rip, insn, streak)
            return Stop(f"vCPU {vcpu.index}: KVM cannot emulate instruction "
                        f"{insn.hex(' ') or '(unknown)'}", EXIT_ERROR)
        return Stop(f"vCPU {vcpu.index}: KVM internal error {internal.suberror}", EXIT_ERROR)
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        code = vcpu.fail_entry.hardware_entry_failure_reason
        return Stop(f"vCPU {vcpu.index}: VM entry failed (hardware reason {code:#x})", EXIT_ERROR)
    if reason == lib.KVM_EXIT_HLT:
        return Stop(f"vCPU {vcpu.index} halted with interrupts off", EXIT_OK)
    return Stop(f"vCPU {vcpu.index}: unexpected exit {EXIT_NAMES.get(reason, reason)}", EXIT_ERROR)


class VcpuThread(threading.Thread):
    """Runs one vCPU until the machine stops."""

    def __init__(self, vcpu, machine):
        super().__init__(name=f"vcpu{vcpu.index}", daemon=True)
        self.vcpu = vcpu
        self.machine = machine
        self.exits: collections.Counter = collections.Counter()
        self.parked = threading.Event()     # set while this vCPU waits out a pause
        self.watch = endings.VcpuWatch(vcpu, self.exits)

    def kick(self) -> None:
        """Make KVM_RUN return now (and at once the next time it is called)."""
        run = self.vcpu.run
        if run is not None:
            run.immediate_exit = 1
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, signal.SIGUSR1)
            except (ProcessLookupError, OSError):
                pass

    def poke(self) -> None:
        """Interrupt KVM_RUN once (a signal only), so the thread answers ``watch.probe_wanted``."""
        if self.ident is not None and self.is_alive():
            try:
                signal.pthread_kill(self.ident, signal.SIGUSR1)
            except (ProcessLookupError, OSError):
                pass

    def run(self) -> None:
        m = self.machine
        vcpu = self.vcpu
        exits = self.exits
        watch = self.watch
        streak = watch.streak
        pio, mmio, quirks, memory = m.pio, m.mmio, m.quirks, m.memory
        stopping, running = m.stopping, m.running
        log.debug("vcpu%d: first KVM_RUN", vcpu.index)
        try:
            while not stopping.is_set():
                if not running.is_set():       # paused: park outside KVM_RUN
                    self.parked.set()
                    running.wait()
                    self.parked.clear()
                    vcpu.run.immediate_exit = 0
                    continue
                r = vcpu.run_once()
                if r < 0:
                    watch.left_kvm = True
                    if watch.probe_wanted:         # the machine's watchdog asks (endings.py)
                        watch.answer_probe()
                    if r == -errno.EINTR:
                        # A kick's immediate_exit must not outlive it: if the pause it
                        # was for is already over, the next KVM_RUN would fail again,
                        # and again, and the guest would never run (resume raced us).
                        vcpu.run.immediate_exit = 0
                        continue
                    if r == -errno.EAGAIN:      # an AP waiting for its start-up IPI
                        time.sleep(0.001)
                        continue
                    m.request_stop(f"vCPU {vcpu.index}: KVM_RUN failed: {os.strerror(-r)}", EXIT_ERROR)
                    return
                reason = vcpu.run.exit_reason
                exits[reason] += 1
                watch.last_reason = reason
                stop = handle_exit(vcpu, pio, mmio, quirks, memory, streak)
                if stop is not None:
                    m.request_stop(stop.reason, stop.code)
                    return
        except Exception as e:                   # a device fault or a bug: stop, never hang
            log.debug("vCPU %d stopped by an exception", vcpu.index, exc_info=True)
            m.request_stop(f"vCPU {vcpu.index}: {e}", EXIT_ERROR)
