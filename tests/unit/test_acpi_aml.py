"""The AML encoder against hand-checked encodings from the ACPI spec (section 20)."""
import pytest

from kvmkit.acpi import aml


@pytest.mark.parametrize("body_len, encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (0xFFD, b"\x4f\xff"), (0xFFE, b"\x81\x00\x01"),
])
def test_pkg_length_counts_its_own_bytes(body_len, encoded):
    assert aml.pkg_length(body_len) == encoded


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0x100, b"\x0b\x00\x01"),
    (0x10000, b"\x0c\x00\x00\x01\x00"), (1 << 32, b"\x0e" + (1 << 32).to_bytes(8, "little")),
])
def test_integers_take_the_shortest_form(value, encoded):
    assert aml.integer(value) == encoded


def test_names_and_paths():
    assert aml.name_string("PCI0") == b"PCI0"
    assert aml.name_string("_S5") == b"_S5_"
    assert aml.name_string("\\_SB.PWRB") == b"\\\x2e_SB_PWRB"
    assert aml.name_string("\\_SB.PCI0.LK17") == b"\\\x2f\x03_SB_PCI0LK17"
    assert aml.name_string("^FOO") == b"^FOO_"
    for bad in ("TOOLONG", "1ABC", "ab", "A.B-"):
        with pytest.raises(aml.AmlError):
            aml.name_string(bad)


def test_eisaid_compresses_as_the_spec_says():
    assert aml.eisaid("PNP0A03") == b"\x0c\x41\xd0\x0a\x03"
    assert aml.eisaid("PNP0501") == b"\x0c\x41\xd0\x05\x01"
    with pytest.raises(aml.AmlError):
        aml.eisaid("pnp0501")


def test_string_buffer_package_name():
    assert aml.string("ACPI0013") == b"\x0dACPI0013\x00"
    assert aml.buffer(b"\x79\x00") == b"\x11\x05\x0a\x02\x79\x00"
    assert aml.package(5, 5, 0, 0) == b"\x12\x08\x04\x0a\x05\x0a\x05\x00\x00"
    assert aml.name("_UID", 0) == b"\x08_UID\x00"
    with pytest.raises(aml.AmlError):
        aml.name("_UID", True)


def test_device_method_and_scope_wrap_their_terms():
    dev = aml.device("PWRB", aml.name("_UID", 0))
    assert dev == b"\x5b\x82\x0b" + b"PWRB" + b"\x08_UID\x00"
    assert aml.scope("\\_SB", dev)[:2] == b"\x10" + bytes([1 + 5 + len(dev)])
    assert aml.method("_EVT", 1) == b"\x14\x06_EVT\x01"
    assert aml.method("_EVT", 1, serialized=True)[-1] == 0x09


def test_resource_descriptors():
    assert aml.io(0x3F8, 8) == b"\x47\x01\xf8\x03\xf8\x03\x01\x08"
    assert aml.irq_no_flags(4) == b"\x22\x10\x00"
    assert aml.interrupt(9, edge=True) == b"\x89\x06\x00\x03\x01\x09\x00\x00\x00"
    assert aml.interrupt(17, shared=True)[3] == 0x09            # consumer, level, high, shared
    word = aml.word_bus_number(0, 0)
    assert word[:6] == b"\x88\x0d\x00\x02\x0c\x00" and word[-2:] == b"\x01\x00"
    q = aml.qword_memory(1 << 32, (1 << 33) - 1)
    assert len(q) == 3 + 43 and q[3:6] == b"\x00\x0c\x01"
    assert aml.resource_template(aml.irq_no_flags(8)).endswith(b"\x22\x00\x01\x79\x00")
    with pytest.raises(aml.AmlError):
        aml.irq_no_flags(16)
