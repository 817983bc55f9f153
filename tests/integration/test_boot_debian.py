"""Debian's stock cloud kernel (linux-image-cloud-amd64), booted from its
bzImage (lz4 legacy payload, decompressed on the host).

It builds virtio as modules, so without a userspace to load them it shows
console, RTC and keyboard controller only (its CPUs come up through ACPI:
test_acpi_debian.py).  On the nested CI host it reaches the RTC after about
4-5 minutes (then spends a long time in its late init calls), so the test
stops it with SIGTERM once the RTC has set the clock.  Those minutes were a
sixth of the whole CI run once the other tests moved into guest userspace, so
on the nested host it is opt-in (--run-slow), like test_acpi_debian.py; on
hardware KVM it runs by default (README: Tests).
"""
import signal

import pytest

from guest import machine_file, run_kvmkit
from kvmkit.hypervisor import host_quirks

pytestmark = [pytest.mark.kvm] + ([pytest.mark.slow] if host_quirks.detect() else [])

CLOCK_SET = r"rtc_cmos \S+: setting system clock to \S+ UTC \((\d+)\)"


@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("debian")
    machine = machine_file(d / "debian.toml", image=guest_kit["DEBIAN_BZIMAGE"], memory="512M", vcpus=1,
                           cmdline="console=ttyS0 panic=-1 reboot=k")
    result = run_kvmkit(["-v", "run", str(machine)], timeout=1500, when=CLOCK_SET,
                        then=lambda proc: proc.send_signal(signal.SIGTERM))
    print(f"debian stock kernel: RTC reached after {result.wall:.0f} s wall")
    print(result.describe())
    return result


def test_debian_banner(boot):
    assert boot.find(r"Linux version 6\.1\.\S+-cloud-amd64"), boot.describe()


def test_debian_console_is_a_16550a(boot):
    assert boot.find(r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A"), boot.describe()


def test_debian_rtc_sets_host_time(boot):
    assert boot.find(r"rtc_cmos \S+: registered as rtc0"), boot.describe()
    found = boot.find(CLOCK_SET)
    assert found, boot.describe()
    assert abs(int(found[1].group(1)) - found[0]) < 5


def test_debian_finds_the_keyboard_controller(boot):
    assert boot.find(r"serio: i8042 KBD port at 0x60,0x64 irq 1"), boot.describe()


def test_debian_stopped_cleanly(boot):
    assert boot.returncode == 143, boot.describe()
