"""The C split queue against the pure-Python reference, on random and hostile rings.

Each case builds two identical guest memories (one RAM region, or two: with
a hole between them, back to back, or ending at the top of the 64-bit
address space), fills rings, descriptors and indirect tables with seeded
random content, then runs the same sequence of queue operations on a
SplitQueue over one copy and a NativeSplitQueue over the other.  Every
operation must give the same result (the same chain, or the same error with
the same message), the queue state must agree after each one, and the two
memories must be byte-identical at the end.
"""
import random
import re
import struct

import pytest

from kvmkit.memory import GuestMemory, Region
from kvmkit.virtio.queue import (SplitQueue, VirtqueueError, avail_ring_size, desc_table_size,
                                 used_ring_size)

NativeSplitQueue = pytest.importorskip(
    "kvmkit_native.queue", reason="kvmkit_native is not installed (pip install -e native/)"
).NativeSplitQueue

MEM = 64 << 10
TOP = 1 << 64
NEXT, WRITE, INDIRECT = 1, 2, 4
CASES = 6000
PUSH_MANY = hasattr(SplitQueue, "push_many")

LAYOUTS = {
    "one": (Region(0, MEM, 0),),
    "hole": (Region(0, 0x6000, 0), Region(0x9000, MEM - 0x6000, 0x6000)),
    "adjacent": (Region(0, 0x8000, 0), Region(0x8000, MEM - 0x8000, 0x8000)),
    "top": (Region(0x1000, 0x7000, 0), Region(TOP - 0x9000, 0x9000, 0x7000)),
}


def memory(layout, content: bytes) -> GuestMemory:
    mem = GuestMemory(MEM, backing=bytearray(content))
    mem.regions = LAYOUTS[layout]
    return mem


class Case:
    """One random queue: its memory image, constructor arguments and operations."""

    def __init__(self, seed: int):
        rng = self.rng = random.Random(seed)
        self.layout = rng.choice(sorted(LAYOUTS))
        self.regions = LAYOUTS[self.layout]
        self.size = rng.choice([1, 2, 4, 8, 8, 16, 16, 32]) if rng.random() > 0.02 else \
            rng.choice([0, 3, 12, 65536, 1 << 32, -1])
        self.event_idx = rng.random() < 0.5
        self.indirect = rng.random() < 0.6
        size = self.size if self.size in (1, 2, 4, 8, 16, 32) else 8
        self.image = bytearray(rng.randbytes(MEM) if rng.random() < 0.2 else MEM)
        self.desc = self.place(desc_table_size(size), 16)
        self.avail = self.place(avail_ring_size(size), 2)
        self.used = self.place(used_ring_size(size), 4)
        self.tables = [self.place(16 * rng.randrange(1, 2 * size + 2), 16) for _ in range(3)]
        self.tables = [t for t in self.tables if self.offset(t) is not None]
        # 0: noise, 1: hostile values, 2: plausible values, 3: a driver's chains, a few corrupted
        mode = rng.choices(range(4), [1, 2, 2, 5])[0]
        if mode == 3:
            self.driver_chains(size)
        elif mode:
            for base, count in [(self.desc, size)] + [(t, 2 * size + 1) for t in self.tables]:
                for i in range(count):
                    self.poke(base + 16 * i, self.descriptor(size, hostile=mode == 1))
            for slot in range(size):
                head = rng.randrange(size + 1) if mode == 1 else rng.randrange(size)
                self.poke(self.avail + 4 + 2 * slot, struct.pack("<H", head))
            idx = rng.choice([rng.randrange(size + 2), rng.getrandbits(16)]) if mode == 1 \
                else rng.randrange(1, size + 1)
            self.poke(self.avail + 2, struct.pack("<H", idx))
            self.poke(self.avail + 4 + 2 * size, struct.pack("<H", rng.randrange(size + 2)))
            self.poke(self.avail, struct.pack("<H", rng.randrange(2)))
        self.ops = [self.operation(size) for _ in range(rng.randrange(1, 3 * size + 6))]

    # -- addresses -------------------------------------------------------------------
    def offset(self, gpa: int, length: int = 1):
        for r in self.regions:
            if r.gpa <= gpa and gpa + length <= r.end:
                return r.offset + gpa - r.gpa
        return None

    def near_edge(self, length: int) -> int:
        """A guest address near the start or end of a region, or in no RAM at all."""
        rng = self.rng
        r = rng.choice(self.regions)
        return rng.choice([
            r.end - length, r.end - length + rng.randrange(1, 17), r.end, r.gpa,
            r.gpa - rng.randrange(1, 17), r.end - rng.randrange(1, 64),
            rng.getrandbits(64), TOP - rng.randrange(1, 64), MEM + rng.randrange(MEM),
        ]) % TOP

    def place(self, length: int, align: int, edge: float = 0.05) -> int:
        """Where to put a ring, table or buffer: mostly inside RAM, sometimes
        (probability ``edge``) at or past the edge of a region."""
        rng = self.rng
        if rng.random() < edge:
            addr = self.near_edge(length)
            return addr if rng.random() < 0.5 else addr // align * align
        r = rng.choice(self.regions)
        if r.size < length:
            return r.gpa
        return r.gpa + rng.randrange(0, r.size - length + 1) // align * align

    def poke(self, gpa: int, data: bytes) -> None:
        off = self.offset(gpa, len(data))
        if off is not None:
            self.image[off:off + len(data)] = data

    def descriptor(self, size: int, hostile: bool) -> bytes:
        rng = self.rng
        if hostile:
            length = rng.choice([0, 1, 16, 32, 48, rng.randrange(1 << 17), 0xFFFF_FFFF,
                                 rng.getrandbits(32)])
            addr = rng.choice([self.place(max(length, 1), 1), self.near_edge(length),
                               rng.choice(self.tables or [0]), rng.getrandbits(64)])
            flags = rng.getrandbits(3) if rng.random() < 0.9 else rng.getrandbits(16)
            nxt = rng.randrange(size + 2) if rng.random() < 0.9 else rng.getrandbits(16)
        else:
            length = rng.choice([0, 1, 16, 100, 256])
            addr = self.place(length, 1)
            flags = rng.choice([0, 0, NEXT, NEXT, WRITE, WRITE | NEXT, INDIRECT])
            if flags == INDIRECT and self.tables:
                addr, length = rng.choice(self.tables), 16 * rng.randrange(1, size + 2)
            nxt = rng.randrange(size)
        return struct.pack("<QIHH", addr % TOP, length, flags, nxt)

    def driver_chains(self, size: int) -> None:
        """Well-formed chains in every available slot (as a driver makes them, some
        through indirect tables), then up to three random corruptions."""
        rng = self.rng
        free = list(range(size))
        rng.shuffle(free)
        tables = list(self.tables)
        slots = 0
        while free and slots < size:
            n = rng.randrange(1, min(len(free), 4) + 1)
            idx, free = free[:n], free[n:]
            nread = rng.randrange(n + 1)
            if self.indirect and tables and rng.random() < 0.3:
                table = tables.pop()
                m = rng.randrange(1, 2 * size + 2)
                for i in range(m):
                    self.poke(table + 16 * i, self.buffer(i >= m // 2, i + 1 if i < m - 1 else 0))
                self.poke(self.desc + 16 * idx[0], struct.pack("<QIHH", table, 16 * m, INDIRECT, 0))
            else:
                for i, d in enumerate(idx):
                    nxt = idx[i + 1] if i < n - 1 else rng.randrange(size)
                    self.poke(self.desc + 16 * d, self.buffer(i >= nread, nxt, last=i == n - 1))
            self.poke(self.avail + 4 + 2 * slots, struct.pack("<H", idx[0]))
            slots += 1
        self.poke(self.avail + 2, struct.pack("<H", rng.randrange(1, slots + 1)))
        for _ in range(rng.randrange(4)):
            gpa = rng.choice([self.desc + rng.randrange(16 * size),
                              self.avail + rng.randrange(4 + 2 * size)] +
                             [t + rng.randrange(32) for t in self.tables])
            self.poke(gpa, rng.randbytes(rng.choice([1, 2, 8])))

    def buffer(self, writable: bool, nxt: int, last: bool = False) -> bytes:
        """A descriptor of a buffer inside RAM (or of none, with length 0)."""
        rng = self.rng
        length = rng.choice([0, 1, 16, 512, 4096]) if rng.random() < 0.95 else 0x7000
        flags = (WRITE if writable else 0) | (0 if last else NEXT)
        if not last and nxt == 0:
            flags &= ~NEXT
        return struct.pack("<QIHH", self.place(length, 1, 0.02) % TOP, length, flags, nxt)

    def used_element(self, size: int, valid: float) -> tuple[int, int]:
        """(head, written) for push, invalid with probability 1 - ``valid``."""
        rng = self.rng
        if rng.random() < valid:
            return rng.randrange(size), rng.choice([0, 1, 512, 0xFFFF_FFFF])
        return rng.choice([(rng.choice([-1, size, 1 << 16]), 0), (0, rng.choice([1 << 32, -1]))])

    def operation(self, size: int):
        rng = self.rng
        kind = rng.choices(["pop", "push", "push_many", "notify", "disable", "enable", "has",
                            "poke"], [6, 4, 2 * PUSH_MANY, 2, 1, 1, 1, 2])[0]
        if kind == "push_many":
            return kind, [self.used_element(size, 0.99) for _ in range(rng.randrange(size + 2))]
        if kind == "push":
            return (kind, *self.used_element(size, 0.9))
        if kind == "poke":                 # the driver changes memory between two calls
            if rng.random() < 0.5:         # it publishes more chains (or jumps ahead)
                return "publish", rng.choice([1, 1, 2, size, size + 1])
            gpa = rng.choice([self.avail + 2, self.avail + 4 + 2 * rng.randrange(size + 1),
                              self.desc + rng.randrange(16 * size), self.avail])
            return kind, gpa, rng.randbytes(rng.choice([1, 2, 2, 8]))
        return (kind,)


def run(queue_cls, case: Case):
    """Outcomes of the case's operations on ``queue_cls``, and the memory afterwards."""
    mem = memory(case.layout, case.image)
    outcomes = []
    try:
        q = queue_cls(mem, case.size, case.desc, case.avail, case.used,
                      event_idx=case.event_idx, indirect=case.indirect)
    except VirtqueueError as e:
        return [("init", str(e))], bytes(mem.host_buffer())
    for op in case.ops:
        try:
            if op[0] == "pop":
                c = q.pop()
                result = c and (c.head, c.readable, c.writable, c.readable_len, c.writable_len)
            elif op[0] == "push":
                result = q.push(op[1], op[2])
            elif op[0] == "push_many":
                result = q.push_many(op[1])
            elif op[0] == "notify":
                result = q.should_notify()
            elif op[0] == "disable":
                result = q.disable_notifications()
            elif op[0] == "enable":
                result = q.enable_notifications()
            elif op[0] == "has":
                result = q.has_available()
            elif op[0] == "publish":
                result = None
                off = case.offset(case.avail + 2, 2)
                if off is not None:
                    idx = struct.unpack_from("<H", mem.host_buffer(), off)[0]
                    struct.pack_into("<H", mem.host_buffer(), off, (idx + op[1]) & 0xFFFF)
            else:
                result = None
                off = case.offset(op[1], len(op[2]))
                if off is not None:
                    mem.host_buffer()[off:off + len(op[2])] = op[2]
        except (VirtqueueError, ValueError) as e:
            result = (type(e).__name__, str(e))
        outcomes.append((op, result, q.broken, q.last_avail_idx, q.used_idx))
    return outcomes, bytes(mem.host_buffer())


def error_kind(message: str) -> str:
    return re.sub(r"0x[0-9a-f]+|\d+", "N", message)


def test_native_queue_matches_the_python_queue():
    kinds: dict[str, int] = {}
    chains = 0
    for seed in range(CASES):
        case = Case(seed)
        want, want_mem = run(SplitQueue, case)
        got, got_mem = run(NativeSplitQueue, case)
        for i, (w, g) in enumerate(zip(want, got)):
            assert g == w, f"seed {seed}, step {i} ({case.layout}, size {case.size})"
        assert len(got) == len(want)
        assert got_mem == want_mem, f"seed {seed}: guest memory differs"
        for step in want:
            result = step[1]
            if step[0] == "init" or isinstance(result, tuple) and isinstance(result[-1], str):
                kind = error_kind(result if step[0] == "init" else result[1])
                kinds[kind] = kinds.get(kind, 0) + 1
            elif isinstance(result, tuple):
                chains += 1
    print(f"\n{CASES} cases: {chains} chains; errors by kind:")
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {n:6} {kind}")
    # The generator reaches every rule the queues enforce but the 2^32-byte limit,
    # which needs gigabytes of RAM (tests/unit/test_virtqueue.py covers it for both).
    expected = ["power of two", "-byte aligned", "table .* not inside guest RAM",
                "ring .* not inside guest RAM", "avail.idx", "head descriptor",
                "outside the N-entry table", "outside the N-entry indirect table", "a loop",
                "longer than the queue size", "not negotiated",
                "inside an indirect table", "both INDIRECT and NEXT", "non-zero multiple",
                "indirect table .* not inside guest RAM", "buffer .* not inside guest RAM",
                "device-readable descriptor after", "needs a reset",
                "not a descriptor index", "does not fit the used element"]
    missing = [e for e in expected if not any(re.search(e, k) for k in kinds)]
    assert not missing, f"never reached: {missing}"
    assert chains > 1000
