"""Guest endings the guest does not announce: halted for good, code run from
nowhere, an emulation-failure storm, a silent stall.

A reset, a power-off or a pvpanic tells kvmkit that the guest is done.  These
do not, and without a check here kvmkit would wait forever:

- **Halted for good.**  With KVM's in-kernel irqchip a ``hlt`` never exits to
  kvmkit; a vCPU sits in KVM_RUN in KVM_MP_STATE_HALTED.  When every vCPU
  has been quiet (no exit) for :data:`PROBE_AFTER_S`, the :class:`Watchdog`
  asks each vCPU thread to look at its own state (a signal interrupts
  KVM_RUN; KVM takes vCPU ioctls only from a thread outside KVM_RUN).  A vCPU
  is stopped for good when it is halted with RFLAGS.IF clear (then no timer
  or device interrupt can wake it, only an NMI or INIT, and kvmkit has no NMI
  source), or it is an application processor still waiting for its start-up
  IPI.  (Halted with IF set is an idle guest, even with every interrupt
  masked: KVM's PIC can still reach a software-disabled local APIC; only
  ``stall_timeout`` ends such a guest.)  Once every vCPU has been so for
  :data:`HALT_GRACE_S` with no exit in between, the machine stops with
  :data:`EXIT_GUEST_HALTED`.  An idle guest halts with IF set: never this.
- **Code run from nowhere.**  KVM cannot fetch instructions from
  guest-physical memory without a memory slot: the vCPU exits with an
  emulation failure that carries no instruction bytes.  kvmkit then looks up
  where RIP points and, outside guest RAM and the reset page, stops with
  status 1 and says so.
- **A storm of the same failure.**  The host-quirk assists complete a few
  instructions KVM's emulator refuses; the same failure at the same RIP
  :data:`STORM_COUNT` times in a row (no other exit between) over at least
  :data:`STORM_MIN_S` is a guest that makes no progress: status 1.
- **A silent stall** (``[machine] stall_timeout``, off by default): no vCPU
  exited to kvmkit for that long (console output and emulated device
  registers exit; the native virtio engines' traffic does not, nor does a
  kernel that prints nothing until its console driver loads):
  :data:`EXIT_STALLED`.
"""
from __future__ import annotations

import dataclasses
import time

from . import chipset
from .hypervisor._kvm import lib
from .plugin_api import EXIT_ERROR, EXIT_GUEST_HALTED, EXIT_STALLED

PROBE_AFTER_S = 0.5          # every vCPU this quiet: ask them whether they stopped for good
HALT_GRACE_S = 1.0           # ... and stopped for this long: end the VM
STORM_COUNT = 1000
STORM_MIN_S = 1.0

RFLAGS_IF = 1 << 9
WAITING_FOR_SIPI = (lib.KVM_MP_STATE_UNINITIALIZED, lib.KVM_MP_STATE_INIT_RECEIVED)


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why the machine stops: one line and kvmkit's exit status (kvmkit.vcpu re-exports it)."""
    reason: str
    code: int


# -- code run from nowhere ---------------------------------------------------------
def code_address(vcpu) -> tuple[int, int | None]:
    """(linear address of the next instruction, its guest-physical address or None)."""
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    linear = (sregs.cs.base + regs.rip) & 0xFFFF_FFFF_FFFF_FFFF
    if not sregs.cr0 & 1:                    # real mode: 20/32-bit physical addresses
        return regs.rip, linear
    return regs.rip, vcpu.translate(linear)


def backed(memory, gpa: int) -> bool:
    return memory.contains(gpa, 1) or chipset.RESET_PAGE <= gpa < chipset.RESET_PAGE + chipset.PAGE


def fetch_from_nowhere(vcpu, memory) -> Stop | None:
    """An emulation failure with no instruction bytes: stop if RIP is outside guest memory."""
    rip, gpa = code_address(vcpu)
    if gpa is None:
        return Stop(f"vCPU {vcpu.index}: executing code at RIP {rip:#x}, which its page tables "
                    "do not map", EXIT_ERROR)
    if not backed(memory, gpa):
        return Stop(f"vCPU {vcpu.index}: executing code outside guest memory: RIP {rip:#x}, "
                    f"guest-physical {gpa:#x}", EXIT_ERROR)
    return None


class FailureStreak:
    """Counts the same emulation failure at the same RIP, exit after exit."""

    def __init__(self, exits, clock=time.monotonic):
        self._exits = exits                  # the vCPU thread's Counter of exits by reason
        self._clock = clock
        self.key = None
        self.count = 0
        self.since = 0.0
        self._at_total = -1

    def record(self, rip: int, insn: bytes) -> bool:
        """After an assisted failure: True when it has become a storm."""
        total = sum(self._exits.values())
        key = (rip, insn)
        if key == self.key and total == self._at_total + 1:
            self.count += 1
        else:
            self.key, self.count, self.since = key, 1, self._clock()
        self._at_total = total
        return self.count >= STORM_COUNT and self._clock() - self.since >= STORM_MIN_S


def assisted(vcpu, rip: int, insn: bytes, streak: FailureStreak | None) -> Stop | None:
    """A host-quirk assist completed ``insn`` at ``rip``: None, or a Stop for a storm."""
    if streak is None or not streak.record(rip, insn):
        return None
    return Stop(f"vCPU {vcpu.index}: stuck: the same emulation failure ({insn[:8].hex(' ')}) at RIP "
                f"{rip:#x} {streak.count} times in a row", EXIT_ERROR)


# -- halted for good ---------------------------------------------------------------------
def stopped_for_good(vcpu) -> str | None:
    """Why this vCPU can never run again by itself, or None.  Call from its own thread."""
    state = vcpu.get_mp_state()
    if state in WAITING_FOR_SIPI:
        return "waiting for a start-up IPI"
    if state != lib.KVM_MP_STATE_HALTED:
        return None
    regs = vcpu.get_regs()
    if not regs.rflags & RFLAGS_IF:
        return f"halted with interrupts off at RIP {regs.rip:#x}"
    return None


class VcpuWatch:
    """One vCPU's side of the watchdog: the thread answers probes and keeps its failure streak."""

    def __init__(self, vcpu, exits):
        self.vcpu = vcpu
        self.exits = exits
        self.streak = FailureStreak(exits)
        self.probe_wanted = False
        self.answer: tuple[int, str | None] | None = None    # (exits when probed, why stopped)
        self.last_reason: int | None = None    # the vCPU thread notes each exit's reason
        self.left_kvm = False                  # KVM_RUN returned at least once (sync regs valid)

    def answer_probe(self) -> None:
        """Called by the vCPU's thread outside KVM_RUN when ``probe_wanted``."""
        self.probe_wanted = False
        total = sum(self.exits.values())
        self.answer = (total, stopped_for_good(self.vcpu))


class Watchdog:
    """The machine run loop's check, called every few hundred milliseconds."""

    def __init__(self, threads, stall_timeout: float = 0.0, clock=time.monotonic):
        self.threads = threads              # VcpuThread: .watch (VcpuWatch), .exits, .poke()
        self.stall_timeout = stall_timeout
        self._clock = clock
        now = clock()
        self._totals = [-1] * len(threads)
        self._changed = [now] * len(threads)
        self._stopped_since: list[float | None] = [None] * len(threads)
        self._why: list[str | None] = [None] * len(threads)

    def tick(self, paused: bool = False) -> Stop | None:
        now = self._clock()
        if paused:                          # a paused VM makes no exits and is not stuck
            self._changed = [now] * len(self.threads)
            self._stopped_since = [None] * len(self.threads)
            return None
        for i, t in enumerate(self.threads):
            total = sum(t.exits.values())
            if total != self._totals[i]:
                self._totals[i], self._changed[i] = total, now
                self._stopped_since[i] = None
        if self.stall_timeout and now - max(self._changed) >= self.stall_timeout:
            return Stop(f"stalled: no vCPU exited for {self.stall_timeout:g} s "
                        f"([machine] stall_timeout); {self.describe()}", EXIT_STALLED)
        if now - max(self._changed) < PROBE_AFTER_S:
            return None
        for i, t in enumerate(self.threads):
            answer, t.watch.answer = t.watch.answer, None
            if answer is not None:
                exits, why = answer
                if exits == self._totals[i] and why is not None:
                    if self._stopped_since[i] is None:
                        self._stopped_since[i] = now
                    self._why[i] = why
                else:
                    self._stopped_since[i] = None
            t.watch.probe_wanted = True
            t.poke()
        since = self._stopped_since
        if all(s is not None for s in since) and now - max(since) >= HALT_GRACE_S:
            return Stop("guest halted: every vCPU stopped for good ("
                        + "; ".join(f"vCPU {i} {w}" for i, w in enumerate(self._why)) + ")",
                        EXIT_GUEST_HALTED)
        return None

    def describe(self) -> str:
        return ", ".join(describe_vcpu(t) for t in self.threads)


def last_exit(thread) -> tuple[str, int | None]:
    """The vCPU's last exit reason, and its RIP when it last left KVM_RUN (its
    last exit, or the watchdog's look while it was quiet), from its kvm_run
    page: no ioctl, and nothing done per exit beyond noting the reason."""
    from .vcpu import EXIT_NAMES
    vcpu, watch = thread.vcpu, thread.watch
    reason = "none" if watch.last_reason is None else EXIT_NAMES.get(watch.last_reason,
                                                                      str(watch.last_reason))
    left = watch.last_reason is not None or watch.left_kvm
    synced = vcpu.run is not None and getattr(vcpu, "regs_synced", False)
    return reason, vcpu.sync_regs.rip if left and synced else None


def describe_vcpu(thread) -> str:
    reason, rip = last_exit(thread)
    at = f", RIP {rip:#x}" if rip is not None else ""
    return f"vCPU {thread.vcpu.index} {sum(thread.exits.values())} exits (last {reason}{at})"


def vcpu_status(thread) -> dict:
    reason, rip = last_exit(thread)
    return {"index": thread.vcpu.index, "exits": sum(thread.exits.values()),
            "last_exit": reason, "rip": None if rip is None else f"{rip:#x}"}
