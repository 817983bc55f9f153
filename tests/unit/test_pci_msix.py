import pytest

from kvmkit.pci import (MSIX_CONTROL_ENABLE, MSIX_CONTROL_FUNCTION_MASK, PCI_CAP_ID_MSIX,
                        ConfigSpace, MsixCapability, MsixTable, MsixVector)

ADDR = 0xFEE0_1000


class Recorder:
    def __init__(self, table):
        self.changes, self.controls, self.delivered = [], [], []
        table.on_vector_change = self.changes.append
        table.on_control_change = lambda e, m: self.controls.append((e, m))
        table.on_deliver = lambda *a: self.delivered.append(a)


def program(table, i, address=ADDR, data=0x4021, masked=False):
    base = 16 * i
    table.write(base + 0, 8, address)                # one qword for address low + high
    table.write(base + 8, 4, data)
    table.write(base + 12, 4, int(masked))


def enabled_table(vectors=4):
    t = MsixTable(vectors)
    t.set_control(True, False)
    return t


# -- the table --------------------------------------------------------------------------------
def test_reset_state_every_vector_masked():
    t = MsixTable(3)
    assert t.size == 48 and t.pba.size == 8
    for i in range(3):
        assert t.vector(i) == MsixVector(0, 0, True)
        assert t.read(16 * i + 12, 4) == 1
        assert t.read(16 * i, 8) == 0 and t.read(16 * i + 8, 4) == 0
    assert not t.enabled and not t.function_masked
    assert t.pba.read(0, 8) == 0


def test_entry_write_and_read_back_dword_and_qword():
    t = MsixTable(2)
    t.write(16, 4, 0xFEE0_0000)
    t.write(20, 4, 0x0000_0001)
    t.write(24, 4, 0x0000_0041)
    t.write(28, 4, 0)
    assert t.vector(1) == MsixVector(0x1_FEE0_0000, 0x41, False)
    assert t.read(16, 8) == 0x1_FEE0_0000
    assert t.read(24, 8) == 0x41
    t.write(24, 8, (1 << 32) | 0x99)                 # data + vector control as one qword
    assert t.vector(1) == MsixVector(0x1_FEE0_0000, 0x99, True)
    assert t.vector(0) == MsixVector(0, 0, True)     # the neighbour is untouched


def test_read_only_bits_of_an_entry():
    t = MsixTable(1)
    t.write(0, 4, 0xFFFF_FFFF)
    t.write(12, 4, 0xFFFF_FFFE)
    assert t.read(0, 4) == 0xFFFF_FFFC               # address bits 1:0 read as 0
    assert t.read(12, 4) == 0                        # only bit 0 of vector control is real


def test_accesses_outside_the_table():
    t = MsixTable(1)
    assert t.read(16, 4) == 0 and t.read(12, 8) == 0
    t.write(16, 4, 1)
    t.write(-4, 4, 1)
    assert t.vector(0) == MsixVector(0, 0, True)


@pytest.mark.parametrize("n", [0, 2049])
def test_vector_count_limits(n):
    with pytest.raises(ValueError):
        MsixTable(n)


def test_vector_index_is_checked():
    t = MsixTable(2)
    for call in (t.vector, t.fire, t.pending):
        with pytest.raises(IndexError):
            call(2)


def test_on_vector_change_only_for_real_changes():
    t = MsixTable(2)
    r = Recorder(t)
    t.write(16, 4, ADDR)
    t.write(16, 4, ADDR)                             # same value
    t.write(16, 4, ADDR | 3)                         # only read-only bits differ
    t.write(28, 4, 0)                                # unmask
    t.write(28, 4, 0)
    t.write(0, 4, 0)                                 # vector 0 already 0
    assert r.changes == [1, 1]


# -- firing, masking, pending -----------------------------------------------------------------
def test_fire_unmasked_returns_the_message():
    t = enabled_table()
    program(t, 2, data=0x31)
    assert t.fire(2) == (ADDR, 0x31)
    assert not t.pending(2) and t.pba.read(0, 8) == 0


def test_fire_while_disabled_is_dropped():
    t = MsixTable(4)
    program(t, 0)
    assert t.fire(0) is None and not t.pending(0)


def test_masked_vector_sets_pending_and_unmask_delivers():
    t = enabled_table()
    r = Recorder(t)
    program(t, 1, data=0x55, masked=True)
    r.changes.clear()
    assert t.fire(1) is None and t.fire(1) is None
    assert t.pending(1) and t.pba.read(0, 8) == 0b10 and t.pba.read(0, 4) == 0b10
    assert r.delivered == []
    t.write(16 + 12, 4, 0)                           # unmask
    assert r.changes == [1]
    assert r.delivered == [(1, ADDR, 0x55)]          # once, however often it fired
    assert not t.pending(1) and t.pba.read(0, 8) == 0


def test_unmask_without_pending_delivers_nothing():
    t = enabled_table()
    r = Recorder(t)
    program(t, 0, masked=True)
    t.write(12, 4, 0)
    assert r.delivered == []


def test_pending_survives_address_changes_and_uses_the_new_message():
    t = enabled_table()
    r = Recorder(t)
    program(t, 0, masked=True)
    t.fire(0)
    t.write(8, 4, 0x77)                              # guest retargets while masked
    assert r.delivered == [] and t.pending(0)
    t.write(12, 4, 0)
    assert r.delivered == [(0, ADDR, 0x77)]


def test_function_mask_holds_every_vector():
    t = enabled_table()
    r = Recorder(t)
    for i in range(4):
        program(t, i, data=0x40 + i, masked=(i == 3))
    t.set_control(True, True)
    assert r.controls == [(True, True)]
    assert [t.fire(i) for i in range(4)] == [None] * 4
    assert t.pba.read(0, 8) == 0b1111
    t.set_control(True, False)
    assert r.delivered == [(0, ADDR, 0x40), (1, ADDR, 0x41), (2, ADDR, 0x42)]
    assert t.pba.read(0, 8) == 0b1000                # vector 3 is still masked on its own
    t.write(3 * 16 + 12, 4, 0)
    assert r.delivered[-1] == (3, ADDR, 0x43) and t.pba.read(0, 8) == 0


def test_without_on_deliver_pending_bits_wait_for_take_deliverable():
    t = enabled_table()
    program(t, 0, masked=True)
    program(t, 1, masked=True, data=9)
    t.fire(0)
    t.fire(1)
    t.write(16 + 12, 4, 0)
    assert t.pending(1)                              # nobody to deliver it yet
    assert t.take_deliverable() == [(1, ADDR, 9)]
    assert t.take_deliverable() == []
    assert t.pending(0) and not t.pending(1)


def test_pba_is_read_only_and_spans_qwords():
    t = enabled_table(vectors=70)
    assert t.pba.size == 16
    program(t, 69, masked=True)
    program(t, 3, masked=True)
    t.fire(69)
    t.fire(3)
    assert t.pba.read(0, 8) == 1 << 3
    assert t.pba.read(8, 8) == 1 << 5 and t.pba.read(8, 4) == 1 << 5 and t.pba.read(12, 4) == 0
    t.pba.write(0, 8, 0)
    t.pba.write(8, 8, 0xFFFF)
    assert t.pba.read(8, 8) == 1 << 5 and t.pending(3)
    assert t.pba.read(16, 8) == 0                    # past the end


def test_disable_keeps_pending_until_enabled_again():
    t = enabled_table()
    r = Recorder(t)
    program(t, 0, masked=True)
    t.fire(0)
    t.set_control(False, False)
    t.write(12, 4, 0)
    assert r.delivered == [] and t.pending(0)
    t.set_control(True, False)
    assert r.delivered == [(0, ADDR, 0x4021)]


# -- the capability -------------------------------------------------------------------------
def function_with_msix(vectors=5):
    c = ConfigSpace(0x1AF4, 0x1041, 0x020000, interrupt_pin=1)
    c.add_bar(0, 0x4000, "mem64")
    c.add_bar(2, 0x1000, "mem32")
    t = MsixTable(vectors)
    cap = MsixCapability(t, table_bar=0, table_offset=0x2000, pba_bar=2, pba_offset=0x800)
    return c, t, cap


def test_capability_body_layout():
    c, t, cap = function_with_msix(5)
    other = c.add_capability(0x09, b"\x04\x00")
    offset = cap.install(c)
    assert offset == 0x44 and cap.offset == offset
    assert c.read(other + 1, 1) == offset
    assert c.read(offset, 1) == PCI_CAP_ID_MSIX and c.read(offset + 1, 1) == 0
    assert c.read(offset + 2, 2) == 4                # table size N - 1
    assert c.read(offset + 4, 4) == 0x2000 | 0       # table offset | BIR 0
    assert c.read(offset + 8, 4) == 0x800 | 2        # PBA offset | BIR 2
    assert c.capabilities() == [(other, 0x09), (offset, PCI_CAP_ID_MSIX)]


def test_enable_and_function_mask_through_config_writes():
    c, t, cap = function_with_msix()
    r = Recorder(t)
    off = cap.install(c)
    c.write(off + 2, 2, 0xFFFF)                      # table size is read-only
    assert c.read(off + 2, 2) == MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK | 4
    assert t.enabled and t.function_masked
    c.write(off + 3, 1, MSIX_CONTROL_ENABLE >> 8)    # byte write to the upper half
    assert t.enabled and not t.function_masked
    c.write(off, 4, 0)                               # dword write from the header
    assert not t.enabled
    assert r.controls == [(True, True), (True, False), (False, False)]
    c.write(off + 4, 4, 0xFFFF_FFFF)                 # table offset/BIR: read-only
    c.write(off + 8, 4, 0)
    assert c.read(off + 4, 4) == 0x2000 and c.read(off + 8, 4) == 0x802
    assert r.controls == [(True, True), (True, False), (False, False)]


def test_function_unmask_through_config_delivers_pending():
    c, t, cap = function_with_msix()
    r = Recorder(t)
    off = cap.install(c)
    c.write(off + 2, 2, MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    program(t, 4, data=0x61)
    assert t.fire(4) is None and t.pending(4)
    c.write(off + 2, 2, MSIX_CONTROL_ENABLE)
    assert r.delivered == [(4, ADDR, 0x61)]
    assert cap.control == MSIX_CONTROL_ENABLE | 4


def test_capability_checks_its_placement():
    t = MsixTable(8)                                 # 128-byte table, 8-byte PBA
    with pytest.raises(ValueError, match="overlap"):
        MsixCapability(t, 0, 0x0, 0, 0x78)
    with pytest.raises(ValueError, match="qword"):
        MsixCapability(t, 0, 0x4, 0, 0x800)
    with pytest.raises(ValueError, match="BAR 6"):
        MsixCapability(t, 6, 0, 0, 0x800)
    c = ConfigSpace(0x1AF4, 0x1041, 0x020000)
    c.add_bar(0, 0x100, "mem32")
    c.add_bar(1, 0x100, "io")
    with pytest.raises(ValueError, match="does not fit"):
        MsixCapability(t, 0, 0x0, 0, 0xF8 + 8).install(c)
    with pytest.raises(ValueError, match="io BAR 1"):
        MsixCapability(t, 0, 0x0, 1, 0x0).install(c)
    with pytest.raises(ValueError):
        MsixCapability(t, 0, 0x0, 3, 0x0).install(c)  # no BAR 3
    cap = MsixCapability(t, 0, 0x0, 0, 0x80)
    assert cap.install(c) == 0x40
    with pytest.raises(ValueError, match="already"):
        cap.install(c)
    with pytest.raises(ValueError, match="not installed"):
        MsixCapability(t, 0, 0x0, 0, 0x80).control


def test_wired_like_the_vmm_does_it():
    """Ports, allocator, MMIO bus and MSI-X together, driven the way Linux does."""
    import threading

    from kvmkit.bus import Bus
    from kvmkit.pci import MmioAllocator, PciHost

    class Function:
        def __init__(self):
            self.config, self.table, self.cap = function_with_msix(vectors=2)
            self.cap.install(self.config)

    host, f = PciHost(), Function()
    r = Recorder(f.table)
    n = host.add(f)
    MmioAllocator().assign_bars(f.config)
    pio, mmio, lock = Bus("pio"), Bus("mmio"), threading.RLock()
    for base, size, handler in host.pio_ranges():
        pio.add(base, size, handler, lock, "pci")
    table_bar, pba_bar = f.config.bar(0), f.config.bar(2)
    mmio.add(table_bar.address + 0x2000, f.table.size, f.table, lock, "msix-table")
    mmio.add(pba_bar.address + 0x800, f.table.pba.size, f.table.pba, lock, "msix-pba")

    def cfg(register, size, value=None):
        pio.write(0xCF8, 4, 0x8000_0000 | (n << 11) | (register & 0xFC))
        if value is None:
            return pio.read(0xCFC + (register & 3), size)
        pio.write(0xCFC + (register & 3), size, value)

    # find the capability, enable MSI-X with the function masked, program, unmask
    pointer = cfg(0x34, 1)
    while cfg(pointer, 1) != PCI_CAP_ID_MSIX:
        pointer = cfg(pointer + 1, 1)
    control = cfg(pointer + 2, 2)
    cfg(pointer + 2, 2, control | MSIX_CONTROL_ENABLE | MSIX_CONTROL_FUNCTION_MASK)
    table = table_bar.address + (cfg(pointer + 4, 4) & ~7)
    mmio.write(table + 16, 4, 0xFEE0_0000)
    mmio.write(table + 20, 4, 0)
    mmio.write(table + 24, 4, 0x4023)
    mmio.write(table + 28, 4, 0)
    assert f.table.fire(1) is None                   # function still masked
    pba = pba_bar.address + (cfg(pointer + 8, 4) & ~7)
    assert mmio.read(pba, 8) == 0b10
    cfg(pointer + 2, 2, control | MSIX_CONTROL_ENABLE)
    assert r.delivered == [(1, 0xFEE0_0000, 0x4023)]
    assert f.table.fire(1) == (0xFEE0_0000, 0x4023)
    assert mmio.read(pba, 8) == 0 and mmio.read(table + 12, 4) == 1   # vector 0 still masked
