import threading

import pytest

from kvmkit.bus import Bus
from kvmkit.pci import (CLASS_BRIDGE_HOST, CONFIG_ADDRESS_PORT, CONFIG_DATA_PORT, ConfigSpace,
                        PciBusFull, PciHost)


class Function:
    def __init__(self, device_id=0x1041, pin=1):
        self.config = ConfigSpace(0x1AF4, device_id, 0x020000, revision=1, interrupt_pin=pin)


def address(device, register=0, bus=0, function=0, enable=True):
    return (enable << 31) | (bus << 16) | (device << 11) | (function << 8) | register


@pytest.fixture
def host():
    return PciHost()


@pytest.fixture
def pio(host):
    bus = Bus("pio")
    lock = threading.RLock()
    for base, size, handler in host.pio_ranges():
        bus.add(base, size, handler, lock, "pci")
    return bus


def cfg_read(pio, device, register, size, **kw):
    pio.write(CONFIG_ADDRESS_PORT, 4, address(device, register & 0xFC, **kw))
    return pio.read(CONFIG_DATA_PORT + (register & 3), size)


def cfg_write(pio, device, register, size, value, **kw):
    pio.write(CONFIG_ADDRESS_PORT, 4, address(device, register & 0xFC, **kw))
    pio.write(CONFIG_DATA_PORT + (register & 3), size, value)


def test_ranges_cover_both_port_blocks(host):
    assert [(b, s) for b, s, _ in host.pio_ranges()] == [(0xCF8, 4), (0xCFC, 4)]


def test_address_latches_only_on_32_bit_writes(pio, host):
    pio.write(0xCF8, 4, 0x8000_1234)
    assert host.address == 0x8000_1234
    assert pio.read(0xCF8, 4) == 0x8000_1234
    pio.write(0xCFB, 1, 0x01)                        # Linux's mechanism #1 probe pokes this byte
    pio.write(0xCF8, 2, 0xFFFF)
    pio.write(0xCF8, 1, 0x00)
    assert pio.read(0xCF8, 4) == 0x8000_1234
    assert pio.read(0xCFA, 2) == 0x8000 and pio.read(0xCF9, 1) == 0x12


def test_reserved_address_bits_read_as_zero(pio):
    pio.write(0xCF8, 4, 0xFFFF_FFFF)
    assert pio.read(0xCF8, 4) == 0x80FF_FFFC


def test_enable_bit_off_reads_all_ones_and_drops_writes(pio, host):
    assert cfg_read(pio, 0, 0, 4, enable=False) == 0xFFFF_FFFF
    cfg_write(pio, 0, 0x3C, 1, 5, enable=False)
    assert host.bridge.config.interrupt_line == 0
    assert cfg_read(pio, 0, 0x3C, 1) == 0


def test_host_bridge_identity(pio):
    assert cfg_read(pio, 0, 0x00, 4) == 0x0008_1B36
    assert cfg_read(pio, 0, 0x08, 4) >> 8 == CLASS_BRIDGE_HOST
    assert cfg_read(pio, 0, 0x0E, 1) == 0
    assert cfg_read(pio, 0, 0x3D, 1) == 0            # no interrupt pin


def test_add_takes_the_next_free_device_number(host):
    a, b = Function(), Function()
    assert host.add(a) == 1 and host.add(b) == 2
    assert host.functions() == [(1, a), (2, b)]
    assert host.function(0) is host.bridge and host.function(2) is b
    assert host.function(3) is None and host.function(32) is None
    with pytest.raises(ValueError):
        host.add(a)
    with pytest.raises(TypeError):
        host.add(object())


def test_interrupt_pins_for_the_mp_table(host):
    host.add(Function(pin=1))
    host.add(Function(pin=0))
    host.add(Function(pin=2))
    assert host.interrupt_pins() == [(1, 1), (3, 2)]


def test_bus_full(host):
    for n in range(1, 32):
        assert host.add(Function()) == n
    with pytest.raises(PciBusFull, match="32"):
        host.add(Function())


@pytest.mark.parametrize("register", [0x00, 0x04, 0x08, 0x2C, 0x3C])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_data_port_offsets_and_sizes(pio, host, register, size):
    f = Function(device_id=0x1041)
    n = host.add(f)
    for lane in range(0, 4, size):
        assert cfg_read(pio, n, register + lane, size) == f.config.read(register + lane, size)


def test_reads_through_every_data_port(pio, host):
    host.add(Function(device_id=0xBEEF))
    pio.write(0xCF8, 4, address(1, 0))
    assert [pio.read(0xCFC + i, 1) for i in range(4)] == [0xF4, 0x1A, 0xEF, 0xBE]
    assert pio.read(0xCFE, 2) == 0xBEEF
    assert pio.read(0xCFD, 2) == 0xEF1A


def test_writes_reach_the_selected_device(pio, host):
    a, b = Function(), Function()
    host.add(a)
    host.add(b)
    cfg_write(pio, 2, 0x3C, 1, 10)
    cfg_write(pio, 2, 0x04, 2, 0x0006)
    cfg_write(pio, 1, 0x3F, 1, 0xAA)                 # max_lat: read-only
    cfg_write(pio, 1, 0x3E, 2, 0xFFFF)
    assert b.config.interrupt_line == 10 and b.config.command == 0x6
    assert a.config.interrupt_line == 0 and a.config.command == 0
    assert cfg_read(pio, 1, 0x3C, 4) == 0x0000_0100
    pio.write(0xCF8, 4, address(1, 0x3C))
    pio.write(0xCFC, 2, 0x0407)                      # line (read/write) and pin (read-only)
    assert a.config.interrupt_line == 7 and a.config.interrupt_pin == 1
    # a 16-bit write at 0xCFE lands on register 0x06: status, write-1-to-clear
    a.config.raise_status(1 << 13)
    pio.write(0xCF8, 4, address(1, 0x04))
    pio.write(0xCFE, 2, 1 << 13)
    assert a.config.status == 0 and a.config.command == 0


def test_bar_sizing_through_the_ports(pio, host):
    f = Function()
    f.config.add_bar(0, 0x4000, "mem32")
    n = host.add(f)
    cfg_write(pio, n, 0x10, 4, 0xFFFF_FFFF)
    assert cfg_read(pio, n, 0x10, 4) == 0xFFFF_C000
    cfg_write(pio, n, 0x10, 4, 0xC000_4000)
    assert f.config.bar_address(0) == 0xC000_4000


@pytest.mark.parametrize("kw", [dict(function=1), dict(function=7), dict(bus=1), dict(bus=255)])
def test_other_functions_and_buses_are_absent(pio, host, kw):
    f = Function()
    n = host.add(f)
    for device in (0, n):
        assert cfg_read(pio, device, 0, 4, **kw) == 0xFFFF_FFFF
        assert cfg_read(pio, device, 0x3C, 1, **kw) == 0xFF
        cfg_write(pio, device, 0x3C, 1, 9, **kw)
    assert f.config.interrupt_line == 0 and host.bridge.config.interrupt_line == 0


def test_empty_slots_read_all_ones(pio, host):
    host.add(Function())
    for device in (2, 17, 31):
        for size in (1, 2, 4):
            assert cfg_read(pio, device, 0, size) == (1 << (8 * size)) - 1
        cfg_write(pio, device, 0x04, 2, 0x7)         # dropped, nothing to raise


def test_enumeration_like_a_guest(pio, host):
    """Scan every device number the way an OS does: vendor ID 0xFFFF means empty."""
    f = Function()
    host.add(f)
    found = {}
    for device in range(32):
        vendor_device = cfg_read(pio, device, 0, 4)
        if vendor_device & 0xFFFF != 0xFFFF:
            found[device] = (vendor_device, cfg_read(pio, device, 0x08, 4) >> 8)
    assert found == {0: (0x0008_1B36, 0x060000), 1: (0x1041_1AF4, 0x020000)}
