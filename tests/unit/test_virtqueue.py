"""The split virtqueue against the driver model (virtio 1.2, 2.7).

Every test that builds a queue runs against both backends: the pure-Python
SplitQueue ("python") and kvmkit_native's C queue ("native", skipped when
kvmkit_native is not installed).
"""
import random
import struct

import pytest

from kvmkit.memory import GuestMemory
from kvmkit.virtio.driver_model import DriverError, DriverQueue, GuestAllocator
from kvmkit.virtio.queue import (VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                 Chain, SplitQueue, VirtqueueError, avail_ring_size,
                                 desc_table_size, used_ring_size)
from requirement import need

MEM = 1 << 20
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


def _native_queue_class():
    try:
        from kvmkit_native.queue import NativeSplitQueue
    except ImportError as e:
        need(False, f"kvmkit_native is not importable ({e}); install it with "
                    f"'.venv/bin/pip install -e native/'")
    return NativeSplitQueue


@pytest.fixture(params=["python", "native"])
def queue_cls(request):
    """The queue backend under test: a class with SplitQueue's constructor and API."""
    return SplitQueue if request.param == "python" else _native_queue_class()


def set_used_idx(q, idx):
    """Start the device's used index (and its last-signalled mark) at ``idx``."""
    q.used_idx = idx
    if isinstance(q, SplitQueue):
        q._signalled_used = idx
    else:
        q.kvq.signalled_used = idx


class Setup:
    def __init__(self, queue_cls, size=16, *, event_idx=False, indirect=False, indirect_max=8,
                 mem_size=MEM):
        self.mem = GuestMemory(mem_size, backing=bytearray(mem_size))
        self.alloc = GuestAllocator(self.mem, 0x1000)
        self.drv = DriverQueue(self.mem, size, self.alloc, indirect_max=indirect_max,
                               event_idx=event_idx)
        self.q = queue_cls(self.mem, size, *self.drv.addresses, event_idx=event_idx,
                           indirect=indirect)

    def buf(self, data=None, length=None):
        if data is not None:
            return self.alloc.put(data), len(data)
        return self.alloc.alloc(length), length

    def snapshot(self):
        return bytes(self.mem.view(0, self.mem.size))


# -- construction ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 3, 24, 65536, 1 << 16 | 1])
def test_queue_size_must_be_power_of_two_up_to_32768(size, queue_cls):
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    with pytest.raises(VirtqueueError, match="power of two"):
        queue_cls(mem, size, 0x1000, 0x2000, 0x3000, event_idx=False, indirect=False)


def test_largest_queue_size_accepted(queue_cls):
    mem = GuestMemory(4 << 20, backing=bytearray(4 << 20))
    q = queue_cls(mem, 32768, 0x0, 0x80000, 0x100000, event_idx=True, indirect=True)
    assert q.pop() is None


@pytest.mark.parametrize("desc,avail,used,what", [
    (0x1008, 0x2000, 0x3000, "descriptor table .* 16-byte"),
    (0x1000, 0x2001, 0x3000, "available ring .* 2-byte"),
    (0x1000, 0x2000, 0x3002, "used ring .* 4-byte"),
])
def test_ring_alignment(desc, avail, used, what, queue_cls):
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    with pytest.raises(VirtqueueError, match=what):
        queue_cls(mem, 16, desc, avail, used, event_idx=False, indirect=False)


@pytest.mark.parametrize("which", ["desc", "avail", "used"])
def test_rings_with_event_words_must_be_in_ram(which, queue_cls):
    mem = GuestMemory(MEM, backing=bytearray(MEM))
    size = 16
    addr = {"desc": 0x1000, "avail": 0x2000, "used": 0x3000}
    lengths = {"desc": desc_table_size(size), "avail": avail_ring_size(size),
               "used": used_ring_size(size)}
    align = {"desc": 16, "avail": 2, "used": 4}[which]
    last_fit = (MEM - lengths[which]) // align * align
    # one alignment step higher the tail (the event word of the rings) sticks out of RAM
    addr[which] = last_fit + align
    with pytest.raises(VirtqueueError, match="not inside guest RAM"):
        queue_cls(mem, size, addr["desc"], addr["avail"], addr["used"],
                  event_idx=False, indirect=False)
    addr[which] = last_fit
    queue_cls(mem, size, addr["desc"], addr["avail"], addr["used"],
              event_idx=False, indirect=False)


# -- well-formed chains -------------------------------------------------------------------

def test_simple_chain_round_trip(queue_cls):
    s = Setup(queue_cls)
    assert s.q.pop() is None and not s.q.has_available()
    out = s.buf(b"hello, device")
    inb = s.buf(length=32)
    head = s.drv.add([out], [inb])
    assert s.q.has_available()
    chain = s.q.pop()
    assert chain == Chain(head, [out], [inb])
    assert (chain.readable_len, chain.writable_len) == (13, 32)
    assert chain.read(s.mem, 0, 13) == b"hello, device"
    chain.write(s.mem, 0, b"reply")
    s.q.push(chain.head, 5)
    assert s.q.pop() is None
    assert s.drv.used() == [(head, 5)]
    assert s.mem.read(inb[0], 5) == b"reply"
    assert s.drv.in_flight == 0


def test_chains_come_out_in_order_and_descriptors_are_reused(queue_cls):
    s = Setup(queue_cls, size=4)
    bufs = [s.buf(bytes([i]) * 8) for i in range(4)]
    heads = [s.drv.add([b]) for b in bufs]
    with pytest.raises(DriverError):
        s.drv.add([bufs[0]])                      # the model refuses to overfill
    popped = [s.q.pop() for _ in range(4)]
    assert [c.head for c in popped] == heads
    assert s.q.pop() is None
    for c in reversed(popped):                    # out-of-order completion is fine
        s.q.push(c.head, 0)
    assert [h for h, _ in s.drv.used()] == list(reversed(heads))
    s.drv.add([bufs[1]])
    assert s.q.pop().readable == [bufs[1]]


def test_read_and_write_scatter_across_buffers(queue_cls):
    s = Setup(queue_cls)
    r = [s.buf(b"abc"), s.buf(b"defgh"), s.buf(b"ij")]
    w = [s.buf(length=2), s.buf(length=3), s.buf(length=4)]
    s.drv.add(r, w)
    c = s.q.pop()
    assert c.read(s.mem, 0, 10) == b"abcdefghij"
    assert c.read(s.mem, 2, 5) == b"cdefg"
    assert c.read(s.mem, 10, 0) == b""
    with pytest.raises(ValueError):
        c.read(s.mem, 8, 3)
    c.write(s.mem, 1, b"XYZW")
    assert [s.mem.read(g, n) for g, n in w] == [b"\0X", b"YZW", b"\0\0\0\0"]
    before = s.snapshot()
    with pytest.raises(ValueError):
        c.write(s.mem, 5, b"12345")               # 5 + 5 > 9: nothing is written
    assert s.snapshot() == before
    views = c.writable_views(s.mem, 1, 7)
    assert [len(v) for v in views] == [1, 3, 3]
    views = c.readable_views(s.mem, 3)
    assert b"".join(bytes(v) for v in views) == b"defghij"


def test_zero_length_descriptors_contribute_nothing(queue_cls):
    s = Setup(queue_cls)
    a = s.buf(b"data")
    # a zero-length descriptor may carry any address: it names no memory
    d = s.drv
    d.write_desc(0, a[0], 4, NEXT, 1)
    d.write_desc(1, 0xFFFF_FFFF_FFFF_0000, 0, NEXT, 2)
    d.write_desc(2, 0x40, 0, WRITE | NEXT, 3)
    d.write_desc(3, a[0], 2, WRITE)
    d.submit_head(0)
    c = s.q.pop()
    assert c.readable == [a] and c.writable == [(a[0], 2)]


def test_chain_of_exactly_queue_size_descriptors(queue_cls):
    s = Setup(queue_cls, size=8)
    bufs = [s.buf(length=4) for _ in range(8)]
    head = s.drv.add(bufs[:3], bufs[3:])
    c = s.q.pop()
    assert (c.head, c.readable, c.writable) == (head, bufs[:3], bufs[3:])


def test_many_chains_wrap_the_free_running_indices(queue_cls):
    s = Setup(queue_cls, size=8, event_idx=True)
    buf = s.buf(length=8)
    total, batch = 70_000, 5
    done = 0
    while done < total:
        heads = []
        for i in range(batch):
            s.mem.write(buf[0], struct.pack("<Q", done + i))
            heads.append(s.drv.add([buf], [], publish=False))
        s.drv.publish()
        for i in range(batch):
            c = s.q.pop()
            assert c.head == heads[i]
            s.q.push(c.head, i)
        assert s.q.pop() is None
        assert s.drv.used() == [(h, i) for i, h in enumerate(heads)]
        done += batch
    assert s.q.last_avail_idx == total % 65536 == s.drv.avail_idx
    assert s.q.used_idx == total % 65536 == s.drv.used_idx


# -- indirect descriptors -----------------------------------------------------------------

def test_indirect_chain(queue_cls):
    s = Setup(queue_cls, indirect=True)
    r = [s.buf(b"header--"), s.buf(b"payload")]
    w = [s.buf(length=1)]
    head = s.drv.add(r, w, indirect=True)
    desc = s.drv.read_desc(head)
    assert desc[2] == INDIRECT and desc[1] == 3 * 16
    c = s.q.pop()
    assert (c.head, c.readable, c.writable) == (head, r, w)
    s.q.push(head, 1)
    assert s.drv.used() == [(head, 1)]


def test_direct_descriptors_then_an_indirect_table(queue_cls):
    """2.7.5.3.2: zero or more chained descriptors followed by one indirect one."""
    s = Setup(queue_cls, indirect=True)
    hdr = s.buf(b"H" * 16)
    data = s.buf(b"D" * 512)
    status = s.buf(length=1)
    table = s.alloc.alloc(32)
    s.drv.write_desc(0, data[0], 512, NEXT, 1, table=table)
    s.drv.write_desc(1, status[0], 1, WRITE, 0, table=table)
    s.drv.write_desc(5, hdr[0], 16, NEXT, 9)
    s.drv.write_desc(9, table, 32, INDIRECT | WRITE)   # WRITE on the table pointer is ignored
    s.drv.submit_head(5)
    c = s.q.pop()
    assert (c.head, c.readable, c.writable) == (5, [hdr, data], [status])


def test_indirect_table_of_one_entry_and_chained_order_inside(queue_cls):
    s = Setup(queue_cls, indirect=True)
    a, b = s.buf(b"first"), s.buf(b"second")
    table = s.alloc.alloc(48)
    # entries used out of table order: 2 -> 0; entry 1 is garbage never reached
    s.drv.write_desc(2, a[0], a[1], NEXT, 0, table=table)
    s.drv.write_desc(0, b[0], b[1], 0, 0, table=table)
    s.drv.write_desc(1, 0xdead_0000_0000, 99, INDIRECT, 7, table=table)
    s.drv.write_desc(0, table, 48, INDIRECT)
    s.drv.submit_head(0)
    # the walk starts at entry 0 of the table (2.7.5.3.1: "the first descriptor is ... entry 0")
    c = s.q.pop()
    assert c.readable == [b]


# -- notification suppression ----------------------------------------------------------

def test_interrupt_suppression_without_event_idx(queue_cls):
    s = Setup(queue_cls)
    b = s.buf(length=4)
    assert not s.q.should_notify()                # nothing pushed
    s.drv.add([b]); s.q.push(s.q.pop().head, 0)
    assert s.q.should_notify()
    assert not s.q.should_notify()                # state reset by the check
    s.drv.set_no_interrupt(True)
    s.drv.add([b]); s.q.push(s.q.pop().head, 0)
    assert not s.q.should_notify()
    s.drv.set_no_interrupt(False)
    s.drv.add([b]); s.q.push(s.q.pop().head, 0)
    assert s.q.should_notify()


def test_interrupt_suppression_with_event_idx(queue_cls):
    s = Setup(queue_cls, event_idx=True)
    b = s.buf(length=4)

    def complete(n):
        for _ in range(n):
            s.drv.add([b])
        for _ in range(n):
            s.q.push(s.q.pop().head, 0)
        s.drv.used()

    complete(1)                                   # used_event 0, used.idx 0 -> 1
    assert s.q.should_notify()
    s.drv.set_used_event(4)                       # "interrupt me when entry 4 is used"
    complete(3)                                   # used.idx 1 -> 4: event not crossed
    assert not s.q.should_notify()
    complete(1)                                   # 4 -> 5 crosses 4
    assert s.q.should_notify()
    complete(2)                                   # 5 -> 7, used_event still 4
    assert not s.q.should_notify()
    s.drv.set_used_event(7)
    complete(3)                                   # 7 -> 10 crosses 7 (batched)
    assert s.q.should_notify()
    s.drv.set_no_interrupt(True)                  # ignored with EVENT_IDX
    s.drv.set_used_event(10)
    complete(1)
    assert s.q.should_notify()


def test_interrupt_event_idx_across_the_wrap(queue_cls):
    s = Setup(queue_cls, size=4, event_idx=True)
    set_used_idx(s.q, 65534)
    s.drv.last_used_idx = 65534
    s.drv.set_used_event(65535)
    b = s.buf(length=4)
    s.drv.add([b]); s.q.push(s.q.pop().head, 0)   # 65534 -> 65535: not crossed
    assert not s.q.should_notify()
    s.drv.add([b]); s.q.push(s.q.pop().head, 0)   # 65535 -> 0 crosses 65535
    assert s.q.should_notify()


def test_kick_suppression_without_event_idx(queue_cls):
    s = Setup(queue_cls)
    b = s.buf(length=4)
    s.drv.add([b], publish=False)
    assert s.drv.kick()
    s.q.disable_notifications()
    s.drv.add([b], publish=False)
    assert not s.drv.kick()                       # NO_NOTIFY set
    s.q.pop(); s.q.pop()
    assert s.q.enable_notifications() is False    # nothing left
    s.drv.add([b], publish=False)
    assert s.drv.kick()


def test_kick_suppression_with_event_idx(queue_cls):
    s = Setup(queue_cls, event_idx=True)
    s.drv.event_idx = True
    b = s.buf(length=4)
    s.drv.add([b], publish=False)
    assert s.drv.kick()                           # avail_event 0: kick for entry 0
    s.q.disable_notifications()
    assert s.q.pop() is not None
    assert s.q.used_idx == 0 and s.drv.avail_event == 0   # not advanced while disabled
    s.drv.add([b], publish=False)
    assert not s.drv.kick()                       # 1 -> 2 does not cross avail_event 0
    s.drv.add([b])                                # published; the device is not polling
    assert s.q.enable_notifications() is True     # chains arrived meanwhile: caller pops
    assert s.drv.avail_event == 1
    assert s.q.pop() is not None and s.q.pop() is not None
    assert s.q.pop() is None
    assert s.drv.avail_event == 3                 # pop() keeps avail_event current
    s.drv.add([b], publish=False)
    assert s.drv.kick()


def test_enable_notifications_reports_a_chain_added_while_disabled(queue_cls):
    s = Setup(queue_cls)
    s.q.disable_notifications()
    s.drv.add([s.buf(length=4)])
    assert s.q.enable_notifications() is True
    assert s.q.pop() is not None


# -- hostile chains ---------------------------------------------------------------------

def _hostile_cases():
    """name -> (setup kwargs, function(s) that writes a bad chain and publishes it)."""

    def out_of_ram(s):
        s.drv.write_desc(0, MEM + 0x1000, 16)
        s.drv.submit_head(0)

    def runs_past_ram(s):
        s.drv.write_desc(0, MEM - 100, 200)
        s.drv.submit_head(0)

    def wraps_address_space(s):
        s.drv.write_desc(0, (1 << 64) - 16, 32)
        s.drv.submit_head(0)

    def second_buffer_out_of_ram(s):
        s.drv.write_desc(0, 0x8000, 16, NEXT, 1)
        s.drv.write_desc(1, MEM, 1, WRITE)
        s.drv.submit_head(0)

    def head_index_too_big(s):
        s.drv.write_desc(0, 0x8000, 16)
        s.drv.submit_head(16)

    def head_index_65535(s):
        s.drv.submit_head(0xFFFF)

    def next_index_too_big(s):
        s.drv.write_desc(0, 0x8000, 16, NEXT, 16)
        s.drv.submit_head(0)

    def self_loop(s):
        s.drv.write_desc(3, 0x8000, 16, NEXT, 3)
        s.drv.submit_head(3)

    def longer_loop(s):
        s.drv.write_desc(0, 0x8000, 16, NEXT, 1)
        s.drv.write_desc(1, 0x8010, 16, NEXT, 2)
        s.drv.write_desc(2, 0x8020, 16, NEXT, 0)
        s.drv.submit_head(0)

    def loop_of_writable(s):
        s.drv.write_desc(5, 0x8000, 16, NEXT | WRITE, 6)
        s.drv.write_desc(6, 0x8010, 16, NEXT | WRITE, 5)
        s.drv.submit_head(5)

    def too_long(s):
        # all 16 descriptors, then one more (the 17th visit must be refused)
        for i in range(16):
            s.drv.write_desc(i, 0x8000 + 16 * i, 16, NEXT, (i + 1) % 16)
        s.drv.submit_head(0)

    def indirect_not_negotiated(s):
        table = s.alloc.alloc(16)
        s.drv.write_desc(0, 0x8000, 16, 0, 0, table=table)
        s.drv.write_desc(0, table, 16, INDIRECT)
        s.drv.submit_head(0)

    def nested_indirect(s):
        inner = s.alloc.alloc(16)
        outer = s.alloc.alloc(32)
        s.drv.write_desc(0, 0x8000, 16, 0, 0, table=inner)
        s.drv.write_desc(0, 0x8000, 16, NEXT, 1, table=outer)
        s.drv.write_desc(1, inner, 16, INDIRECT, 0, table=outer)
        s.drv.write_desc(0, outer, 32, INDIRECT)
        s.drv.submit_head(0)

    def indirect_len_not_multiple_of_16(s):
        table = s.alloc.alloc(32)
        s.drv.write_desc(0, 0x8000, 16, 0, 0, table=table)
        s.drv.write_desc(0, table, 24, INDIRECT)
        s.drv.submit_head(0)

    def indirect_len_zero(s):
        s.drv.write_desc(0, 0x8000, 0, INDIRECT)
        s.drv.submit_head(0)

    def indirect_table_out_of_ram(s):
        s.drv.write_desc(0, MEM - 16, 32, INDIRECT)
        s.drv.submit_head(0)

    def indirect_with_next(s):
        table = s.alloc.alloc(16)
        s.drv.write_desc(0, 0x8000, 16, 0, 0, table=table)
        s.drv.write_desc(0, table, 16, INDIRECT | NEXT, 1)
        s.drv.write_desc(1, 0x8000, 16)
        s.drv.submit_head(0)

    def indirect_loop(s):
        table = s.alloc.alloc(64)
        for i in range(4):
            s.drv.write_desc(i, 0x8000, 16, NEXT, (i + 1) % 4, table=table)
        s.drv.write_desc(0, table, 64, INDIRECT)
        s.drv.submit_head(0)

    def indirect_next_past_table(s):
        table = s.alloc.alloc(32)
        s.drv.write_desc(0, 0x8000, 16, NEXT, 2, table=table)   # table has 2 entries
        s.drv.write_desc(1, 0x8000, 16, 0, 0, table=table)
        s.drv.write_desc(0, table, 32, INDIRECT)
        s.drv.submit_head(0)

    def indirect_buffer_out_of_ram(s):
        table = s.alloc.alloc(16)
        s.drv.write_desc(0, MEM - 8, 16, WRITE, 0, table=table)
        s.drv.write_desc(0, table, 16, INDIRECT)
        s.drv.submit_head(0)

    def writable_then_readable(s):
        s.drv.write_desc(0, 0x8000, 16, NEXT | WRITE, 1)
        s.drv.write_desc(1, 0x8010, 16)
        s.drv.submit_head(0)

    def writable_then_readable_in_indirect(s):
        table = s.alloc.alloc(32)
        s.drv.write_desc(0, 0x8000, 16, NEXT | WRITE, 1, table=table)
        s.drv.write_desc(1, 0x8010, 16, 0, 0, table=table)
        s.drv.write_desc(0, table, 32, INDIRECT)
        s.drv.submit_head(0)

    def writable_direct_then_readable_in_indirect(s):
        table = s.alloc.alloc(16)
        s.drv.write_desc(0, 0x8010, 16, 0, 0, table=table)
        s.drv.write_desc(0, 0x8000, 16, NEXT | WRITE, 1)
        s.drv.write_desc(1, table, 16, INDIRECT)
        s.drv.submit_head(0)

    def indirect_chain_longer_than_queue(s):
        table = s.alloc.alloc(17 * 16)            # 17 entries, all chained: 17 > size 16
        for i in range(17):
            s.drv.write_desc(i, 0x8000, 16, NEXT if i < 16 else 0, i + 1, table=table)
        s.drv.write_desc(0, table, 17 * 16, INDIRECT)
        s.drv.submit_head(0)

    def direct_plus_indirect_longer_than_queue(s):
        table = s.alloc.alloc(8 * 16)
        for i in range(8):
            s.drv.write_desc(i, 0x8000, 16, NEXT if i < 7 else 0, i + 1, table=table)
        for i in range(9):                        # 9 direct + 8 in the table = 17
            s.drv.write_desc(i, 0x8000, 16, NEXT, i + 1)
        s.drv.write_desc(9, table, 8 * 16, INDIRECT)
        s.drv.submit_head(0)

    def avail_idx_jumps_ahead(s):
        s.drv.write_desc(0, 0x8000, 16)
        s.drv.write_avail_entry(0, 0)
        s.drv.set_avail_idx(17)                   # 17 new entries in a 16-entry ring

    def avail_idx_goes_backwards(s):
        s.drv.set_avail_idx(0xFFFF)               # "65535 new entries"

    plain, ind = {}, {"indirect": True}
    return {
        "out_of_ram": (plain, out_of_ram),
        "runs_past_ram": (plain, runs_past_ram),
        "wraps_address_space": (plain, wraps_address_space),
        "second_buffer_out_of_ram": (plain, second_buffer_out_of_ram),
        "head_index_too_big": (plain, head_index_too_big),
        "head_index_65535": (plain, head_index_65535),
        "next_index_too_big": (plain, next_index_too_big),
        "self_loop": (plain, self_loop),
        "longer_loop": (plain, longer_loop),
        "loop_of_writable": (plain, loop_of_writable),
        "too_long": (plain, too_long),
        "indirect_not_negotiated": (plain, indirect_not_negotiated),
        "nested_indirect": (ind, nested_indirect),
        "indirect_len_not_multiple_of_16": (ind, indirect_len_not_multiple_of_16),
        "indirect_len_zero": (ind, indirect_len_zero),
        "indirect_table_out_of_ram": (ind, indirect_table_out_of_ram),
        "indirect_with_next": (ind, indirect_with_next),
        "indirect_loop": (ind, indirect_loop),
        "indirect_next_past_table": (ind, indirect_next_past_table),
        "indirect_buffer_out_of_ram": (ind, indirect_buffer_out_of_ram),
        "writable_then_readable": (plain, writable_then_readable),
        "writable_then_readable_in_indirect": (ind, writable_then_readable_in_indirect),
        "writable_direct_then_readable_in_indirect": (ind, writable_direct_then_readable_in_indirect),
        "indirect_chain_longer_than_queue": (ind, indirect_chain_longer_than_queue),
        "direct_plus_indirect_longer_than_queue": (ind, direct_plus_indirect_longer_than_queue),
        "avail_idx_jumps_ahead": (plain, avail_idx_jumps_ahead),
        "avail_idx_goes_backwards": (plain, avail_idx_goes_backwards),
    }


HOSTILE = _hostile_cases()


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_chain_raises_and_writes_nothing(name, event_idx, queue_cls):
    kwargs, make = HOSTILE[name]
    s = Setup(queue_cls, event_idx=event_idx, **kwargs)
    s.mem.write(0x8000, bytes(range(256)) * 4)    # recognisable buffer contents
    make(s)
    before = s.snapshot()
    with pytest.raises(VirtqueueError):
        s.q.pop()
    assert s.snapshot() == before                 # not even the rings were written
    assert s.q.broken
    with pytest.raises(VirtqueueError, match="needs a reset"):
        s.q.pop()                                 # the queue stays broken
    assert s.snapshot() == before


def test_indirect_table_of_queue_size_entries_is_accepted(queue_cls):
    """Linux fills an indirect table with up to seg_max + 2 entries; with
    seg_max = size - 2 that is exactly the queue size, plus the table pointer."""
    s = Setup(queue_cls, size=16, indirect=True, indirect_max=16)
    bufs = [s.buf(length=8) for _ in range(16)]
    head = s.drv.add(bufs[:1], bufs[1:], indirect=True)
    c = s.q.pop()
    assert (c.head, len(c.readable), len(c.writable)) == (head, 1, 15)


def test_chain_over_4_gib_in_total(queue_cls):
    size = 3 << 30                                # anonymous, untouched: costs no RAM
    mem = GuestMemory(size)                       # (the queue's views keep it mapped)
    alloc = GuestAllocator(mem, 0x1000, 0x100000)
    drv = DriverQueue(mem, 8, alloc)
    q = queue_cls(mem, 8, *drv.addresses, event_idx=False, indirect=False)
    drv.add([(0x100000, 0x8000_0000), (0x100000, 0x8000_0000)])   # exactly 2^32: allowed
    assert q.pop().readable_len == 1 << 32
    drv.add([(0x100000, 0x8000_0000), (0x100000, 0x8000_0000), (0x100000, 1)])
    with pytest.raises(VirtqueueError, match="2\\^32"):
        q.pop()


def test_good_chain_before_a_bad_one_is_still_served(queue_cls):
    s = Setup(queue_cls)
    good = s.buf(b"ok")
    head = s.drv.add([good])
    s.drv.write_desc(5, MEM, 4)
    s.drv.submit_head(5)
    assert s.q.pop().head == head
    with pytest.raises(VirtqueueError):
        s.q.pop()
    s.q.push(head, 0)                             # completing earlier work still works
    assert s.drv.used() == [(head, 0)]


def test_descriptor_is_read_once(queue_cls):
    """The device copies each descriptor once: a driver rewriting it after the
    pop cannot move a checked buffer out of RAM."""
    s = Setup(queue_cls)
    a = s.buf(b"abcd")
    s.drv.add([a])
    c = s.q.pop()
    s.drv.write_desc(0, MEM + 0x100000, 4)
    assert c.readable == [a] and c.read(s.mem, 0, 4) == b"abcd"


# -- fuzzing ----------------------------------------------------------------------------

FUZZ_MEM = 64 << 10


def _check_chain(mem, chain, size):
    assert 0 <= chain.head < size
    for gpa, n in chain.readable + chain.writable:
        assert n > 0 and mem.contains(gpa, n)


@pytest.mark.parametrize("event_idx,indirect", [(False, False), (True, True)])
def test_fuzz_rings_with_random_bytes(event_idx, indirect, queue_cls):
    rng = random.Random(0x5EED + event_idx)
    size = 8
    popped = errors = 0
    for iteration in range(2000):
        s = Setup(queue_cls, size, event_idx=event_idx, indirect=indirect, mem_size=FUZZ_MEM)
        d = s.drv
        table = s.alloc.alloc(8 * 16)
        mode = iteration % 3
        if mode == 0:                             # pure noise in every ring and the table
            for gpa, n in ((d.desc, desc_table_size(size)), (d.avail, avail_ring_size(size)),
                           (table, 128)):
                s.mem.write(gpa, rng.randbytes(n))
        else:
            # mode 1: plausible values mixed with hostile ones; mode 2: mostly valid
            hostile = mode == 1
            for t, count in ((None, size), (table, 8)):
                for i in range(count):
                    if hostile:
                        addr = rng.choice([rng.randrange(0, FUZZ_MEM + 64), table,
                                           rng.getrandbits(64)])
                        length = rng.choice([0, 1, 16, 32, 128, rng.randrange(0, 1 << 17)])
                        flags = rng.randrange(0, 8)
                    else:
                        addr = rng.randrange(0, FUZZ_MEM - 256)
                        length = rng.choice([0, 1, 16, 100, 256])
                        flags = rng.choice([0, 0, NEXT, NEXT, WRITE, WRITE | NEXT, INDIRECT])
                        if flags == INDIRECT:
                            addr, length = table, 16 * rng.randrange(1, 9)
                    nxt = rng.randrange(0, size + (2 if hostile else 0))
                    d.write_desc(i, addr, length, flags, nxt, table=t)
            for slot in range(size):
                d.write_avail_entry(slot, rng.randrange(0, size + 1) if hostile or slot % 2
                                    else rng.randrange(0, size))
            d.set_avail_idx(rng.randrange(0, size + 2) if hostile else rng.randrange(1, size + 1))
        used, used_len = d.used_ring, used_ring_size(size)
        before = s.snapshot()
        for _ in range(size + 2):
            try:
                chain = s.q.pop()
            except VirtqueueError:
                errors += 1
                break
            if chain is None:
                break
            popped += 1
            _check_chain(s.mem, chain, size)
            s.q.push(chain.head, chain.writable_len)
        s.q.should_notify()
        s.q.enable_notifications()
        after = s.snapshot()                      # only the used ring may have changed
        assert before[:used] == after[:used]
        assert before[used + used_len:] == after[used + used_len:]
    print(f"fuzz: {popped} chains served, {errors} refused")
    assert popped > 100 and errors > 100          # both paths were exercised
