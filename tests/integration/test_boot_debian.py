"""Debian's stock cloud kernel (linux-image-cloud-amd64), booted from its
bzImage (lz4 legacy payload, decompressed on the host).

It builds virtio as modules and has no MP-table support, so until ACPI exists
it runs on one CPU and shows console and RTC only.  On the nested CI host it
takes many minutes (README: "Tests"), so it is marked slow and left out of the
default run; `pytest --run-slow` includes it.
"""

import pytest

from guest import run_kvmkit

pytestmark = [pytest.mark.kvm, pytest.mark.slow]


@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("debian")
    machine = d / "debian.toml"
    machine.write_text(f"""
[machine]
memory = "512M"
vcpus = 1

[kernel]
image = "{guest_kit['DEBIAN_BZIMAGE']}"
cmdline = "console=ttyS0 panic=-1 reboot=k"

[[device]]
kind = "serial8250"

[[device]]
kind = "rtc"

[[device]]
kind = "i8042"
""")
    result = run_kvmkit(["-v", "run", str(machine)], timeout=3000)
    print(result.describe())
    return result


def test_debian_banner(boot):
    assert boot.find(r"Linux version 6\.1\.\S+-cloud-amd64"), boot.describe()


def test_debian_console_is_a_16550a(boot):
    assert boot.find(r"ttyS0 at I/O 0x3f8 .* is a 16550A"), boot.describe()


def test_debian_rtc(boot):
    found = boot.find(r"rtc_cmos .*registered as rtc0")
    assert found, boot.describe()
    clock = boot.find(r"setting system clock to \S+ UTC \((\d+)\)")
    if clock:
        assert abs(int(clock[1].group(1)) - clock[0]) < 5
