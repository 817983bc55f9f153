"""Boot the kit's small kernel with 2 vCPUs and check what the guest reports.

One boot is shared by every check here (a boot costs about a minute on the
nested CI host).  The guest ends by itself: its busybox userspace prints
what it sees, and a hook runs a plain ``reboot`` (busybox init stops
everything, then the kernel resets through the i8042 plugin with
``reboot=k``); kvmkit exits 0.
"""
import time

import pytest

from guest import initrd_with_hooks, machine_file, run_kvmkit

pytestmark = pytest.mark.kvm

@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("small")
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio",
                               {"reboot": "#!/bin/sh\ntouch /tmp/kvmkit-no-reset\nreboot\n"})
    machine = machine_file(d / "small.toml", name="small-smp", image=guest_kit["SMALL_VMLINUX"],
                           initrd=initrd, vcpus=2,
                           cmdline="console=ttyS0 panic=-1 reboot=k")
    result = run_kvmkit(["-v", "run", str(machine)], timeout=900)
    print(result.describe())
    return result


def test_kernel_banner(boot):
    assert boot.find(r"Linux version 6\.1\."), boot.describe()


def test_console_is_a_16550a(boot):
    assert boot.find(r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A"), boot.describe()


def test_two_cpus_brought_up(boot):
    assert boot.find(r"smp: Brought up 1 node, 2 CPUs"), boot.describe()


def test_rtc_sets_the_clock_to_host_time(boot):
    found = boot.find(r"setting system clock to (\S+) UTC \((\d+)\)")
    assert found, boot.describe()
    host_time, m = found
    assert abs(int(m.group(2)) - host_time) < 5, (m.group(0), time.ctime(host_time))


def test_reaches_init(boot):
    assert boot.find(r"Run /init as init process"), boot.describe()


def test_cpuid_bits_cleared_on_the_nested_host(boot, on_pvm_host):
    if not on_pvm_host:
        pytest.skip("host quirks are only active on a paravirtual nested KVM host")
    from kvmkit.hypervisor.host_quirks import CLEARCPUID
    found = boot.find(r"Clearing CPUID bits: (.*)")
    assert found, boot.describe()
    cleared = set(found[1].group(1).split())
    assert set(CLEARCPUID.split(",")) <= cleared, cleared


def test_reset_ends_kvmkit_with_status_0(boot):
    assert boot.returncode == 0, boot.describe()
    assert "guest reset (i8042)" in boot.stderr, boot.describe()


def test_userspace_reports(boot):
    assert boot.find(r"kvmkit-guest: userspace up"), boot.describe()
    assert boot.find(r"kvmkit-guest: cpus=2"), boot.describe()
    assert boot.find(r"kvmkit-guest: uname=6\.1\."), boot.describe()
    found = boot.find(r"kvmkit-guest: date=(\d+)")
    assert found and abs(int(found[1].group(1)) - found[0]) < 5, boot.describe()
    assert not boot.find(r"Attempted to kill init|Kernel panic"), boot.describe()


def test_plain_reboot_goes_through_busybox_init(boot):
    assert boot.find(r"kvmkit-guest: done"), boot.describe()
    assert boot.find(r"The system is going down NOW!|Sent SIGTERM to all processes"), boot.describe()
    assert boot.find(r"reboot: Restarting system"), boot.describe()
