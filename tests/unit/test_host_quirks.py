from kvmkit.hypervisor import host_quirks
from kvmkit.hypervisor.cpu_setup import vcpu_cpuid


def test_clearcpuid_fits_linux_61_limit():
    word = [w for w in host_quirks.CMDLINE_WORDS if w.startswith("clearcpuid=")][0]
    assert len(word.split("=", 1)[1]) < 128


def test_extend_cmdline_keeps_user_words():
    out = host_quirks.extend_cmdline("console=ttyS0 clearcpuid=avx nopv")
    words = out.split()
    assert words[:3] == ["console=ttyS0", "clearcpuid=avx", "nopv"]
    assert words.count("nopv") == 1
    assert sum(w.startswith("clearcpuid=") for w in words) == 1
    assert "tsc=reliable" in words and "noxsave" in words


def test_extend_cmdline_gives_the_tsc_rate():
    assert "tsc_early_khz=2445430" in host_quirks.extend_cmdline("console=ttyS0", 2445430).split()
    assert "tsc_early_khz" not in host_quirks.extend_cmdline("console=ttyS0", None)
    # the user's own value wins
    words = host_quirks.extend_cmdline("tsc_early_khz=1000", 2445430).split()
    assert [w for w in words if w.startswith("tsc_early_khz=")] == ["tsc_early_khz=1000"]


def test_resolve_setting(monkeypatch):
    monkeypatch.setattr(host_quirks, "detect", lambda: True)
    assert host_quirks.resolve("auto") is True
    assert host_quirks.resolve("off") is False
    monkeypatch.setattr(host_quirks, "detect", lambda: False)
    assert host_quirks.resolve("auto") is False
    assert host_quirks.resolve("on") is True


def test_instruction_bytes_from_internal_data():
    data = bytes(8) + bytes([2, 0x0F, 0xAE]) + bytes(21)
    assert host_quirks.emulation_failure_insn(data) == b"\x0f\xae"
    assert host_quirks.emulation_failure_insn(b"") == b""
    garbage = bytes(8) + bytes([255]) + bytes(23)
    assert len(host_quirks.emulation_failure_insn(garbage)) == 15


SUPPORTED = [[0, 0, 0, 0xD, 0, 0, 0], [1, 0, 0, 0x806F0, 0x800, 0, 0],
             [0xB, 0, 1, 0, 0, 0, 0],                      # KVM reports only sub-leaf 0
             [4, 0, 1, 0x121, 0, 0, 0], [4, 3, 1, 0x0, 0, 0, 0]]


def test_cpuid_apic_ids_and_topology():
    rows = {(r[0], r[1]): r for r in vcpu_cpuid(SUPPORTED, 3, 4)}
    assert rows[(1, 0)][4] >> 24 == 3                      # initial APIC id
    assert rows[(1, 0)][5] & (1 << 31)                     # hypervisor bit
    assert rows[(0xB, 0)][6] == 3 and rows[(0xB, 1)][6] == 3
    assert rows[(0xB, 1)][3] == 2 and rows[(0xB, 1)][4] == 4      # shift 2, 4 cores
    assert (rows[(0xB, 1)][5] >> 8) & 0xFF == 2                    # core level
    assert (rows[(0xB, 2)][5] >> 8) & 0xFF == 0                    # no further levels
    assert rows[(4, 0)][3] >> 26 == 3                              # cores per package - 1
    assert rows[(4, 3)][3] == 0                                    # null cache leaf untouched


def test_cpuid_single_vcpu():
    rows = {(r[0], r[1]): r for r in vcpu_cpuid(SUPPORTED, 0, 1)}
    assert rows[(1, 0)][4] >> 24 == 0
    assert not rows[(1, 0)][6] & (1 << 28)
