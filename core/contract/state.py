"""The contract's ``state`` chapter: a device saved mid-operation and restored
into a fresh instance behaves identically (see kvmkit.device_state).

Per example table (a virtio kind: per queue backend too), :class:`StateRun`

* creates the device ("A") and drives it: register devices (I/O ranges and PCI
  BARs) with seeded random register accesses on a FakeContext; virtio devices
  behind the core's real virtio-pci transport on a
  :class:`~kvmkit.fake_machine.FakeMachine`, set up by a virtio-pci driver
  (MSI-X, a vector per queue) that then sends seeded random chains;
* saves A (with the engines paused, as a paused VM has them), checks the
  state is plain JSON-able data with a ``"version"``, and restores its JSON
  round trip into a fresh instance ("B", a virtio one on a copy of A's guest
  memory);
* checks that B saves the same state, then drives A and B with the same
  further accesses (or chains) and compares every register read (or every
  used element's head and length).

A device whose plugin refuses with StateUnsupported from its own
``snapshot_state`` (it cannot be saved in its present state) passes, as it
tells the user why; one with no state support at all fails.  A register
device whose reads follow the host's clock could differ on a second boundary
between A's and B's read: a mismatch is tried once more from the start.
"""
from __future__ import annotations

import json
import random
import time
from typing import Any

from ..device_state import StateUnsupported, restore_device, save_device
from ..fakes import FakeContext
from ..plugin_api import MMIO, PIO, VirtqueueError
from .base import ContractFailure, random_access

__all__ = ["StateRun"]

DRIVE_ACCESSES = 300            # register accesses before the save, and after it on A and B
DRIVE_CHAINS = 12               # virtio chains before the save, and after it on A and B
ENGINE_WAIT_S = 1.0             # how long used elements from an engine's thread are awaited
ATTEMPTS = 2
MEMORY_SIZE = 4 << 20


class _Mismatch(Exception):
    pass


class _IsVirtio(Exception):
    """A kind without the queue key turned out to add a virtio device."""


def _plain(state: Any) -> Any:
    return json.loads(json.dumps(state))


class StateRun:
    def __init__(self, contract, pm, config, label: str, rng: random.Random):
        self.contract, self.pm, self.config, self.label = contract, pm, config, label
        self.seed = rng.getrandbits(32)

    def fail(self, message: str, cause: BaseException | None = None) -> ContractFailure:
        error = ContractFailure(f"{self.label}: state: {message}")
        error.__cause__ = cause
        return error

    def run(self) -> None:
        virtio = self.contract.spec().key("queue") is not None
        for attempt in range(ATTEMPTS):
            try:
                try:
                    (self._virtio if virtio else self._registers)(random.Random(self.seed + attempt))
                except _IsVirtio:
                    virtio = True
                    self._virtio(random.Random(self.seed + attempt))
                return
            except _Mismatch as e:
                if attempt == ATTEMPTS - 1:
                    raise self.fail(str(e)) from None

    # -- shared --------------------------------------------------------------------------------
    def _create(self, ctx):
        try:
            device = self.pm.hook.kvmkit_create_device(kind=self.contract.kind, config=self.config,
                                                       ctx=ctx)
        except Exception as e:
            raise self.fail(f"kvmkit_create_device raised {type(e).__name__}: {e}", e) from e
        if device is None:
            raise self.fail("kvmkit_create_device returned None for its own kind")
        return device

    def _save(self, ctx, device):
        """A's state, or None when the device refuses with a reason of its own."""
        try:
            state = save_device(ctx, device)
        except StateUnsupported as e:
            own = getattr(device, "snapshot_state", None)
            models = [getattr(r, "device", None) for r in getattr(ctx, "virtio_runtimes", ())]
            if callable(own) or any(callable(getattr(m, "snapshot_state", None)) for m in models):
                return None            # the plugin has state support; it refused saying why
            raise self.fail(f"{e}: give the device snapshot_state() and restore_state() "
                            "(docs/hooks.md, \"Device state\")") from None
        except Exception as e:
            raise self.fail(f"saving raised {type(e).__name__}: {e}", e) from e
        try:
            plain = _plain(state)
        except (TypeError, ValueError) as e:
            raise self.fail(f"the saved state is not JSON-able data: {e}") from None
        if plain != state:
            raise self.fail("the saved state changes in a JSON round trip (tuples, non-str keys, "
                            "floats that do not survive?): keep to dicts, lists, str, int, bool, None")
        if not isinstance(state.get("version"), int):
            raise self.fail("the saved state has no int \"version\"")
        return plain

    def _restore(self, ctx, device, state) -> None:
        try:
            restore_device(ctx, device, state)
        except Exception as e:
            raise self.fail(f"restoring its own saved state raised {type(e).__name__}: {e}", e) from e

    def _same_state(self, ctx_b, b, state) -> None:
        again = self._save(ctx_b, b)
        if again != state:
            raise self.fail(f"the restored device saves another state: {_first_difference(state, again)}")

    # -- register devices --------------------------------------------------------------------
    def _registers(self, rng: random.Random) -> None:
        kind = self.contract.kind
        a_ctx = FakeContext(f"{kind}.0", machine_name="contract", memory_size=MEMORY_SIZE)
        a = self._create(a_ctx)
        try:
            if a_ctx.virtio:
                raise _IsVirtio()
            ranges = _ranges(a_ctx)
            if not ranges:
                return                       # nothing a guest reaches (the device check says so)
            for _ in range(DRIVE_ACCESSES):
                self._access(a_ctx, rng.choice(ranges), rng)
            state = self._save(a_ctx, a)
            if state is None:
                return
            plan = [(rng.randrange(len(ranges)), rng.getrandbits(32)) for _ in range(DRIVE_ACCESSES)]
            seen = [self._access(a_ctx, ranges[pick], random.Random(seed)) for pick, seed in plan]
        finally:
            _close(a_ctx, a)                 # before B: they may share host paths (a socket)
        b_ctx = FakeContext(f"{kind}.0", machine_name="contract", memory_size=MEMORY_SIZE)
        b = self._create(b_ctx)
        try:
            self._restore(b_ctx, b, state)
            self._same_state(b_ctx, b, state)
            ranges = _ranges(b_ctx)
            for i, ((pick, seed), got_a) in enumerate(zip(plan, seen)):
                got_b = self._access(b_ctx, ranges[pick], random.Random(seed))
                if got_a != got_b:
                    raise _Mismatch(f"access {i} after the restore: {got_a[0]} gave "
                                    f"{got_a[1]!r} on the saved device, {got_b[1]!r} on the "
                                    "restored one")
        finally:
            _close(b_ctx, b)

    def _access(self, ctx, rng_range, rng: random.Random):
        space, base, size, handler, what_range = rng_range
        width, offset, is_write, value, what = random_access(rng, space, base, size, (1, 2, 4),
                                                             what_range)
        try:
            with ctx.lock:
                if is_write:
                    handler.write(offset, width, value)
                    return what, None
                return what, handler.read(offset, width)
        except Exception as e:
            return what, f"{type(e).__name__}: {e}"

    # -- virtio devices ------------------------------------------------------------------------
    def _virtio(self, rng: random.Random) -> None:
        from ..fake_machine import FakeMachine
        from ..memory import GuestMemory
        from ..virtio.pci_test_driver import PciVirtioDriver
        kind = self.contract.kind
        ma = FakeMachine(GuestMemory(MEMORY_SIZE, backing=bytearray(MEMORY_SIZE)))
        ctx_a = ma.context(f"{kind}.0")
        a = None
        try:
            a = self._create(ctx_a)
            if not ctx_a.virtio_runtimes:
                raise self.fail("a virtio kind (it has the queue key) added no virtio device")
            rt_a = ctx_a.virtio_runtimes[0]
            drv_a = PciVirtioDriver(ma, rt_a, event_idx=rng.random() < 0.5,
                                    rings_at=0x10000, buffers_at=0x100000)
            self._chains(drv_a, rng, DRIVE_CHAINS)
            for rt in ctx_a.virtio_runtimes:
                rt.pause()                   # as Machine.pause leaves them for the save
            try:
                state = self._save(ctx_a, a)
            finally:
                for rt in ctx_a.virtio_runtimes:
                    rt.resume()
            if state is None:
                return
            saved_memory = bytearray(ma.memory.read(0, MEMORY_SIZE))
            saved_driver = drv_a.clone(ma, rt_a)
            seeds = [rng.getrandbits(32) for _ in range(DRIVE_CHAINS)]
            seen = [self._chains(drv_a, random.Random(seed), 1) for seed in seeds]
        finally:
            _close_machine(ma, a)            # before B: they may share host paths
        mb = FakeMachine(GuestMemory(MEMORY_SIZE, backing=saved_memory))
        ctx_b = mb.context(f"{kind}.0")
        b = self._create(ctx_b)
        try:
            self._restore(ctx_b, b, state)
            self._same_state(ctx_b, b, state)
            drv_b = saved_driver.clone(mb, ctx_b.virtio_runtimes[0])
            for i, (seed, got_a) in enumerate(zip(seeds, seen)):
                got_b = self._chains(drv_b, random.Random(seed), 1)
                if got_a != got_b:
                    raise _Mismatch(f"chain {i} after the restore: the saved device returned "
                                    f"{got_a}, the restored one {got_b} (queue, head, length)")
        finally:
            _close_machine(mb, b)

    def _chains(self, drv, rng: random.Random, count: int) -> list:
        """Send ``count`` random chains to random queues; the used elements
        (queue, head, length) each kick brought back."""
        out = []
        nq = len(drv.queues)
        for _ in range(count):
            q = rng.randrange(nq)
            queue = drv.queues[q]
            if len(queue.free) < 3:
                continue
            readable = [rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(0, 2))]
            writable = [rng.randrange(1, 256) for _ in range(rng.randrange(0 if readable else 1, 2))]
            try:
                drv.submit(q, readable, writable)
                used = drv.notify(q)
                used += self._settle(drv, q)
            except VirtqueueError:
                used = []
            out.extend((q, head, n) for head, n in used)
        return out

    def _settle(self, drv, q: int) -> list:
        """Used elements an engine's thread returns after the kick."""
        if q not in drv.runtime.offloads:
            return []
        queue = drv.queues[q]
        deadline = time.monotonic() + ENGINE_WAIT_S
        out = []
        while queue.in_flight and time.monotonic() < deadline:
            drv.machine.run_kicks()
            out += queue.used()
            time.sleep(0.002)
        return out


def _ranges(ctx) -> list:
    ranges = [(space, base, size, handler, "") for space in (PIO, MMIO)
              for base, size, handler in ctx.io[space]]
    for config, bars in getattr(ctx, "pci", ()):
        for index, handler in bars.items():
            bar = config.bar(index)
            ranges.append((MMIO if bar.is_memory else PIO, bar.address, bar.size, handler,
                           f"BAR{index} "))
    return ranges


def _close_device(device) -> None:
    close = getattr(device, "close", None)
    if device is not None and callable(close):
        try:
            close()
        except Exception:
            pass


def _close_machine(machine, device) -> None:
    machine.close()                      # stops the transports, as the VMM does first
    _close_device(device)


def _close(ctx, device) -> None:
    ctx.stopping.set()
    _close_device(device)
    try:
        ctx.close()
    except RuntimeError:
        pass


def _first_difference(a: Any, b: Any, where: str = "state") -> str:
    if type(a) is not type(b):
        return f"{where} is {a!r} saved, {b!r} restored"
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{where}[{k!r}] is only in the {'saved' if k in a else 'restored'} state"
            if a[k] != b[k]:
                return _first_difference(a[k], b[k], f"{where}[{k!r}]")
    if isinstance(a, list):
        if len(a) != len(b):
            return f"{where} has {len(a)} items saved, {len(b)} restored"
        for i, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where} is {a!r} saved, {b!r} restored"
