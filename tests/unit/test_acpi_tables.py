"""ACPI tables: checksums, lengths, layout, the platform registers, the
devices' own nodes, and `iasl -d` as an independent oracle (the disassembly
must compile back with no errors and no warnings)."""
import shutil
import struct
import subprocess
import types

import pytest

from kvmkit.acpi import aml, dsdt, firmware, platform, tables
from kvmkit.config import ConfigError, machine_from_dict
from kvmkit_i8042.plugin import KeyboardController
from kvmkit_rtc.plugin import RtcDevice
from kvmkit_serial8250.plugin import SerialPort

BASE, LIMIT = 0xF0000, 0x100000
PCI = dsdt.PciLayout(io_windows=((0, 0xCF7), (0xD00, 0xFFFF)), mmio32=(0xC000_0000, 0xFEBF_FFFF),
                     mmio64=dsdt.high_window(512 << 20), intx=((1, 1, 17), (2, 1, 18), (3, 1, 17)))


def device_nodes():
    return [SerialPort.acpi_node(types.SimpleNamespace(port=0x3F8, irq=4), aml),
            SerialPort.acpi_node(types.SimpleNamespace(port=0x2F8, irq=3), aml),
            RtcDevice.acpi_node(types.SimpleNamespace(port=0x70, irq=8), aml),
            KeyboardController.acpi_node(types.SimpleNamespace(irq=1), aml)]


def build(vcpus=2, nodes=None):
    return firmware.build(BASE, LIMIT, vcpus=vcpus, lapic_addr=0xFEE0_0000, ioapic_addr=0xFEC0_0000,
                          pci=PCI, power=platform.registers(), ged_gsi=10,
                          ospm_port=platform.BASE + platform.OSPM,
                          device_nodes=device_nodes() if nodes is None else nodes)


def at(t, addr, length):
    return t.blob[addr - t.base:addr - t.base + length]


def test_rsdp_points_at_the_xsdt_and_checksums():
    t = build()
    rsdp = at(t, t.rsdp_addr, tables.RSDP_SIZE)
    assert rsdp[:8] == b"RSD PTR " and rsdp[15] == 2
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36
    assert struct.unpack_from("<Q", rsdp, 24)[0] == t.addresses[b"XSDT"]
    assert t.rsdp_addr % 16 == 0 and 0xE0000 <= t.rsdp_addr < 0x100000     # where Linux scans


@pytest.mark.parametrize("sig", [b"XSDT", b"FACP", b"APIC", b"DSDT"])
def test_every_table_has_a_valid_header(sig):
    t = build()
    data = t.table(sig)
    assert data[:4] == sig
    assert struct.unpack_from("<I", data, 4)[0] == len(data)
    assert tables.checksum(data) == 0
    assert t.addresses[sig] % 16 == 0
    assert LIMIT >= t.addresses[sig] + len(data)


def test_xsdt_lists_fadt_and_madt_and_fadt_points_at_dsdt_and_facs():
    t = build()
    x = t.table(b"XSDT")
    assert struct.unpack_from("<2Q", x, 36) == (t.addresses[b"FACP"], t.addresses[b"APIC"])
    f = t.table(b"FACP")
    assert len(f) == 276 and f[8] == 6
    assert struct.unpack_from("<Q", f, 140)[0] == t.addresses[b"DSDT"]
    facs = t.addresses[b"FACS"]
    assert facs % 64 == 0 and struct.unpack_from("<IQ", f, 36)[0] == facs
    assert struct.unpack_from("<Q", f, 132)[0] == facs
    assert at(t, facs, 8) == b"FACS" + struct.pack("<I", 64)
    flags = struct.unpack_from("<I", f, 112)[0]
    assert not flags & tables.FADT_HW_REDUCED_ACPI           # Linux keeps KVM's PIT and PICs
    assert flags & tables.FADT_RESET_REG_SUP and flags & tables.FADT_TMR_VAL_EXT
    assert struct.unpack_from("<H", f, 46)[0] == platform.SCI_IRQ
    assert struct.unpack_from("<III", f, 56)[0] == platform.BASE + platform.PM1_STS
    assert struct.unpack_from("<I", f, 64)[0] == platform.BASE + platform.PM1_CNT
    assert struct.unpack_from("<I", f, 76)[0] == platform.BASE + platform.PM_TMR
    assert tuple(f[88:92]) == (4, 2, 0, 4)
    space, width, _off, _acc, addr = struct.unpack_from("<BBBBQ", f, 116)
    assert (space, width, addr, f[128]) == (1, 8, 0xCF9, 0x06)     # the chipset's reset control
    assert struct.unpack_from("<BBBBQ", f, 148)[4] == platform.BASE + platform.PM1_STS
    assert struct.unpack_from("<BBBBQ", f, 172)[4] == platform.BASE + platform.PM1_CNT
    assert struct.unpack_from("<BBBBQ", f, 208)[4] == platform.BASE + platform.PM_TMR


@pytest.mark.parametrize("vcpus", [1, 2, 8])
def test_madt_has_a_local_apic_per_vcpu_the_ioapic_and_the_timer_override(vcpus):
    m = build(vcpus).table(b"APIC")
    assert struct.unpack_from("<I", m, 36)[0] == 0xFEE0_0000
    entries, off = [], 44
    while off < len(m):
        kind, length = m[off], m[off + 1]
        entries.append((kind, m[off:off + length]))
        off += length
    assert off == len(m)
    lapics = [e for k, e in entries if k == 0]
    assert [(e[2], e[3]) for e in lapics] == [(i, i) for i in range(vcpus)]
    assert all(struct.unpack_from("<I", e, 4)[0] == 1 for e in lapics)
    (ioapic,) = [e for k, e in entries if k == 1]
    assert ioapic[2] == vcpus and struct.unpack_from("<II", ioapic, 4) == (0xFEC0_0000, 0)
    isos = [struct.unpack_from("<BBIH", e, 2) for k, e in entries if k == 2]
    # ISA IRQ 0 -> GSI 0, as KVM routes it; the SCI level-triggered, active high
    assert isos == [(0, 0, 0, 0), (0, 9, 9, 0x000D)]


def test_tables_that_do_not_fit_are_an_error():
    big = [aml.device(f"D{i:03X}", aml.name("_UID", aml.buffer(bytes(4000)))) for i in range(20)]
    with pytest.raises(firmware.AcpiLayoutError, match="only"):
        build(nodes=big)


def test_high_window_starts_above_ram_and_4g():
    assert dsdt.high_window(256 << 20)[0] == 4 << 30
    assert dsdt.high_window((6 << 30) + 1)[0] == 7 << 30
    assert dsdt.high_window(1 << 39) is None


def test_dsdt_names_the_devices_and_s5():
    d = build().table(b"DSDT")
    for needle in (aml.eisaid("PNP0A03"), aml.eisaid("PNP0501"), aml.eisaid("PNP0B00"),
                   aml.eisaid("PNP0303"), aml.eisaid("PNP0C0C"), aml.string("ACPI0013"), b"_S5_",
                   b"S3F8", b"S2F8", b"RTC_", b"LK17", b"LK18", b"_PRT"):
        assert needle in d
    assert d.count(b"LK17") == 3            # the link device and two _PRT entries


# -- the platform registers ----------------------------------------------------------------
def test_platform_power_off_and_ospm():
    stops = []
    p = platform.AcpiPlatform(lambda reason, code: stops.append((reason, code)))
    assert p.read(platform.PM1_CNT, 2) & platform.SCI_EN                  # always in ACPI mode
    p.write(platform.PM1_CNT, 2, dsdt.S5_SLP_TYP << 10)                   # no SLP_EN: nothing
    p.write(platform.PM1_CNT, 2, (3 << 10) | platform.SLP_EN)             # S3: not offered
    p.write(0x6, 1, 0x01)                   # the old reset register: reserved now
    assert stops == []
    p.write(platform.PM1_CNT, 2, (dsdt.S5_SLP_TYP << 10) | platform.SLP_EN)
    assert stops == [("guest power-off", 0)]
    p.write(platform.PM1_EN, 2, 0x0100)
    assert p.read(platform.PM1_EN, 2) == 0x0100 and p.read(platform.PM1_STS, 2) == 0
    assert p.read(platform.OSPM, 1) == 0
    p.write(platform.OSPM, 1, dsdt.OSPM_READY)
    p.write(platform.OSPM, 1, dsdt.EVENT_TAKEN)
    assert p.ospm_ready and p.events_taken == 1 and p.read(platform.OSPM, 1) == 1


def test_pm_timer_counts_at_3_579545_mhz_and_wraps_at_32_bits():
    now = [100.0]
    p = platform.AcpiPlatform(lambda *a: None, clock=lambda: now[0])
    assert p.read(platform.PM_TMR, 4) == 0
    now[0] += 1.0
    assert p.read(platform.PM_TMR, 4) == 3_579_545
    assert p.read(platform.PM_TMR, 2) == 3_579_545 & 0xFFFF
    assert p.read(platform.PM_TMR + 2, 2) == 3_579_545 >> 16
    now[0] = 100.0 + (1 << 32) / 3_579_545 + 1.0
    assert p.read(platform.PM_TMR, 4) < 3_579_545 + 10


# -- [machine] acpi --------------------------------------------------------------------------
def test_acpi_key_defaults_on_and_turns_off(tmp_path):
    base = {"kernel": {"image": "vmlinux"}}
    assert machine_from_dict(base, source=None, base_dir=tmp_path).acpi is True
    off = machine_from_dict({**base, "machine": {"acpi": False}}, source=None, base_dir=tmp_path)
    assert off.acpi is False
    with pytest.raises(ConfigError, match=r"\[machine\] acpi.*true or false"):
        machine_from_dict({**base, "machine": {"acpi": "no"}}, source=None, base_dir=tmp_path)


# -- iasl as the oracle ----------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("iasl") is None,
                    reason="iasl not installed (Debian: apt-get install acpica-tools; scripts/setup does)")
@pytest.mark.parametrize("sig", [b"XSDT", b"FACS", b"FACP", b"APIC", b"DSDT"])
def test_iasl_disassembles_and_recompiles_without_warnings(tmp_path, sig):
    t = build()
    dat = tmp_path / f"{sig.decode().lower()}.dat"
    dat.write_bytes(t.table(sig))
    r = subprocess.run(["iasl", "-d", dat.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    dsl = dat.with_suffix(".dsl")
    text = dsl.read_text()
    if sig == b"DSDT":
        for name in ("PNP0A03", "PNP0501", "PNP0B00", "PNP0303", "PNP0C0C", "ACPI0013", "_S5_", "_PRT",
                     "Notify (\\_SB.PWRB, 0x80)", "Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive"):
            assert name in text, f"{name} missing from the disassembly"
    r = subprocess.run(["iasl", "-vs", "-p", str(tmp_path / "again"), dsl.name], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert "0 Errors, 0 Warnings" in out, out
    compiled = (tmp_path / "again.aml").read_bytes()
    if sig != b"DSDT":     # iasl optimises AML; data tables come back byte for byte (iasl is the creator)
        original = t.table(sig)
        assert compiled[:4] == sig and compiled[10:28] == original[10:28] and compiled[36:] == original[36:]
