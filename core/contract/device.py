"""The contract's ``device`` chapter: created from example tables against a
FakeContext, a device registers something a guest can reach, survives a fuzz
of random register accesses (a virtio device: of its configuration space and
of garbage rings, on every installed queue backend) raising nothing but what
it documents, and leaves no thread running after ``close()``."""
from __future__ import annotations

import random
import struct
import threading
import time

from ..fakes import FakeContext
from ..plugin_api import MMIO, PIO, VirtioDevice, VirtqueueError
from ..virtio.device import VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1
from ..virtio.queue import MAX_QUEUE_SIZE, avail_ring_size, desc_table_size, used_ring_size
from .base import ContractFailure, random_access

__all__ = ["DeviceRun", "installed_queue_backends"]

FUZZ_ACCESSES = 2000            # register accesses per registered range
FUZZ_SECONDS = 2.0              # ... or this long, whichever ends first
VIRTIO_ROUNDS = 12              # garbage ring layouts per virtio device
ENGINE_SETTLE_S = 0.05          # per queue and round: how long a backend's engine is served
CONFIG_ACCESSES = 200           # virtio configuration-space accesses
THREAD_GRACE_S = 2.0            # how long close() may take to end the device's threads
MEMORY_SIZE = 4 << 20           # guest memory of the contract's FakeContext


def installed_queue_backends() -> list[str]:
    """"python", and "native" when kvmkit-native is installed and loads."""
    from ..virtio.backends import BackendError, resolve
    names = ["python"]
    try:
        resolve("native", "contract")
        names.append("native")
    except BackendError:
        pass
    return names


class DeviceRun:
    """One device's life under the contract: create, start, fuzz, close."""

    def __init__(self, contract, pm, config, label: str, allowed, rng: random.Random,
                 accesses: int, virtio_rounds: int, thread_grace: float):
        self.contract, self.pm, self.config, self.label = contract, pm, config, label
        self.allowed = tuple(allowed)
        self.rng = rng
        self.accesses = accesses
        self.virtio_rounds = virtio_rounds
        self.thread_grace = thread_grace

    def fail(self, message: str, cause: BaseException | None = None) -> ContractFailure:
        error = ContractFailure(f"{self.label}: {message}")
        error.__cause__ = cause
        return error

    def run(self) -> None:
        kind = self.contract.kind
        before = set(threading.enumerate())
        ctx = FakeContext(f"{kind}.0", machine_name="contract", memory_size=MEMORY_SIZE,
                          join_timeout=self.thread_grace)
        try:
            device = self.pm.hook.kvmkit_create_device(kind=kind, config=self.config, ctx=ctx)
        except Exception as e:
            ctx.stopping.set()
            raise self.fail(f"kvmkit_create_device raised {type(e).__name__}: {e}", e) from e
        failure: BaseException | None = None
        try:
            self._exercise(ctx, device)
        except BaseException as e:
            failure = e
        problems = self._close(ctx, device, before)
        if failure is not None:
            raise failure
        if problems:
            raise self.fail("; ".join(problems))

    def _exercise(self, ctx, device) -> None:
        if device is None:
            raise self.fail(f"kvmkit_create_device returned None for its own kind {self.contract.kind!r}")
        ranges = ctx.io[PIO] + ctx.io[MMIO]
        functions = list(getattr(ctx, "pci", ()))          # (config space, {bar: handler})
        if not ranges and not ctx.virtio and not functions:
            raise self.fail("the device registered no I/O range (ctx.add_io), no virtio device "
                            "(ctx.add_virtio) and no PCI function: the guest could never reach it")
        start = getattr(device, "start", None)
        if callable(start):
            try:
                start()
            except Exception as e:
                raise self.fail(f"start() raised {type(e).__name__}: {e}", e) from e
        for space in (PIO, MMIO):
            for base, size, handler in list(ctx.io[space]):
                self._fuzz_range(ctx, space, base, size, handler)
        for config, bars in functions:
            for index, handler in bars.items():
                bar = config.bar(index)
                self._fuzz_range(ctx, MMIO if bar.is_memory else PIO, bar.address, bar.size, handler,
                                 f"BAR{index} ")
        for model, backend in zip(list(ctx.virtio), list(ctx.queue_backends)):
            self._fuzz_virtio(ctx, model, backend)

    # -- registers ---------------------------------------------------------------------------
    def _fuzz_range(self, ctx, space: str, base: int, size: int, handler, what_range: str = "") -> None:
        widths = (1, 2, 4) if space == PIO else (1, 2, 4, 8)
        deadline = time.monotonic() + FUZZ_SECONDS
        for i in range(self.accesses):
            width, offset, is_write, value, what = random_access(self.rng, space, base, size,
                                                                 widths, what_range)
            try:
                with ctx.lock:
                    if is_write:
                        handler.write(offset, width, value)
                    else:
                        got = handler.read(offset, width)
            except self.allowed:
                continue
            except Exception as e:
                raise self.fail(f"{what} raised {type(e).__name__}: {e} (access {i} of the register "
                                "fuzz); in a VM this stops the guest: answer bad accesses as "
                                "hardware would", e) from e
            if not is_write and (isinstance(got, bool) or not isinstance(got, int)):
                raise self.fail(f"{what} returned {got!r}, not an int")
            if time.monotonic() > deadline:
                break

    # -- virtio -------------------------------------------------------------------------------
    def _fuzz_virtio(self, ctx, model, backend) -> None:
        if not isinstance(model, VirtioDevice):
            raise self.fail(f"ctx.add_virtio got {model!r}, not a kvmkit.plugin_api.VirtioDevice")
        sizes = list(model.queue_sizes)
        if not isinstance(model.device_id, int) or model.device_id <= 0:
            raise self.fail(f"device_id {model.device_id!r} is not a virtio device type (> 0)")
        if not sizes or any(not 1 <= s <= MAX_QUEUE_SIZE or s & (s - 1) for s in sizes):
            raise self.fail(f"queue_sizes {sizes!r}: need at least one queue, each a power of two "
                            f"up to {MAX_QUEUE_SIZE}")
        if not 0 <= model.pci_class <= 0xFFFFFF:
            raise self.fail(f"pci_class {model.pci_class:#x} is not a 24-bit class code")
        rng = self.rng
        length = len(model.config_bytes())
        for _ in range(CONFIG_ACCESSES):
            offset, width = rng.randrange(0, length + 16), rng.choice((1, 2, 4, 8))
            value = rng.getrandbits(8 * width)
            self._virtio_call(ctx, f"config_write({offset}, {width}, {value:#x})",
                              model.config_write, offset, width, value)
            got = self._virtio_call(ctx, f"config_read({offset}, {width})",
                                    model.config_read, offset, width)
            if got is not None and (isinstance(got, bool) or not isinstance(got, int)):
                raise self.fail(f"config_read({offset}, {width}) returned {got!r}, not an int")
        memory = ctx.memory
        for round_ in range(self.virtio_rounds):
            features = model.features | (1 << VIRTIO_F_VERSION_1)
            event_idx, indirect = rng.random() < 0.5, rng.random() < 0.5
            features |= (1 << VIRTIO_F_RING_EVENT_IDX if event_idx else 0)
            features |= (1 << VIRTIO_F_RING_INDIRECT_DESC if indirect else 0)
            queues = _garbage_queues(memory, rng, sizes, event_idx, indirect, backend.split_queue)
            self._virtio_call(ctx, "activate()", model.activate, queues, features)
            engines = getattr(getattr(model, "host", None), "engines", {})
            for index in range(len(sizes)):
                if index in engines:             # the backend's engine serves it on its thread
                    self._drive_engine(ctx, model.host, engines[index], index, round_)
                    continue
                self._virtio_call(ctx, f"process({index}) on garbage rings (round {round_})",
                                  model.process, index, queue_error_ok=True)
            self._virtio_call(ctx, "reset()", model.reset)

    def _drive_engine(self, ctx, host, engine, index: int, round_: int) -> None:
        """Kick a queue a backend's engine runs, and serve what it hands back
        to Python until it goes quiet (a short while: the rings are garbage)."""
        import select
        host.kick()
        deadline = time.monotonic() + ENGINE_SETTLE_S
        while time.monotonic() < deadline:
            if select.select([engine.event_fd], [], [], 0.01)[0]:
                self._virtio_call(ctx, f"the {index} engine's service() on garbage rings "
                                  f"(round {round_})", engine.service, queue_error_ok=True)

    def _virtio_call(self, ctx, what: str, method, *args, queue_error_ok: bool = False):
        try:
            with ctx.lock:
                return method(*args)
        except VirtqueueError:
            if queue_error_ok:               # documented: the transport sets DEVICE_NEEDS_RESET
                return None
            raise
        except self.allowed:
            return None
        except Exception as e:
            raise self.fail(f"virtio {what} raised {type(e).__name__}: {e}; only VirtqueueError may "
                            "leave process() (the transport then resets the device)", e) from e

    # -- the end ----------------------------------------------------------------------------
    def _close(self, ctx, device, before: set) -> list[str]:
        problems = []
        ctx.stopping.set()                     # as the VMM does before closing devices
        close = getattr(device, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:
                problems.append(f"close() raised {type(e).__name__}: {e}")
        try:
            ctx.close()
        except RuntimeError as e:
            cause = e.__cause__
            problems.append(f"{e}{f': {type(cause).__name__}: {cause}' if cause else ''}")
        deadline = time.monotonic() + self.thread_grace
        while True:
            leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
            if not leaked or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if leaked:
            problems.append("threads still running after close(): "
                            + ", ".join(t.name for t in leaked)
                            + " (start threads with ctx.spawn and end them when ctx.stopping is set)")
        return problems


_DESC = struct.Struct("<QIHH")
_NEXT, _WRITE, _INDIRECT = 1, 2, 4


def _garbage_queues(memory, rng: random.Random, sizes: list[int], event_idx: bool,
                    indirect: bool, split_queue) -> list:
    """Queues of the given sizes (made by a backend's ``split_queue``) holding
    chains a careless or hostile driver could write: mostly well-formed chains
    over buffers of random bytes, with a few fields (address, length, flags,
    next, avail.idx, heads) replaced by hostile values."""
    layouts, at = [], 0x1000
    for size in sizes:
        desc = at
        avail = desc + desc_table_size(size)
        used = -(-(avail + avail_ring_size(size)) // 4) * 4
        at = -(-(used + used_ring_size(size)) // 4096) * 4096
        layouts.append((size, desc, avail, used))
    data_start = at
    memory.write(data_start, rng.randbytes(min(memory.size - data_start, 1 << 20)))
    queues = []
    for size, desc, avail, used in layouts:
        table = [[rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16),
                  rng.getrandbits(16)] for _ in range(size)]
        free = list(range(size))
        rng.shuffle(free)
        heads = []
        while free:
            n = min(rng.choice((1, 1, 2, 2, 3, 4)), len(free))
            chain = [free.pop() for _ in range(n)]
            readable = rng.randrange(0, n + 1)          # device-readable ones come first
            for j, i in enumerate(chain):
                length = rng.choice((1, 2, 16, 512, 4096, rng.randrange(1, 8192)))
                addr = rng.randrange(data_start, memory.size - length)
                flags = (_NEXT if j < n - 1 else 0) | (_WRITE if j >= readable else 0)
                table[i] = [addr, length, flags, chain[j + 1] if j < n - 1 else 0]
            heads.append(chain[0])
        ring_idx = len(heads)
        for _ in range(rng.choice((0, 0, 1, 3))):       # hostile touches
            i, what = rng.randrange(size), rng.randrange(6)
            if what == 0:
                table[i][0] = rng.getrandbits(64)
            elif what == 1:
                table[i][1] = rng.choice((0, rng.getrandbits(32)))
            elif what == 2:
                table[i][2] = rng.choice((_INDIRECT, _INDIRECT | _NEXT, _NEXT, rng.getrandbits(16)))
            elif what == 3:
                table[i][3] = rng.choice((i, rng.randrange(size + 4)))
            elif what == 4:
                ring_idx = rng.getrandbits(16)
            else:
                heads[rng.randrange(len(heads))] = rng.randrange(size + 4)
        memory.write(desc, b"".join(_DESC.pack(a, n & 0xFFFFFFFF, f & 0xFFFF, x & 0xFFFF)
                                    for a, n, f, x in table))
        slots = heads + [rng.randrange(size + 4) for _ in range(size - len(heads))]
        ring = struct.pack(f"<HH{size}HH", 0, ring_idx & 0xFFFF, *slots, rng.getrandbits(16))
        memory.write(avail, ring)
        memory.write(used, bytes(used_ring_size(size)))
        queues.append(split_queue(memory, size, desc, avail, used, event_idx=event_idx,
                                  indirect=indirect))
    return queues
