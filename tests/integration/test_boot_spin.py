"""The kit's small kernel with 2 vCPUs and a /init that spins without ever
making a system call: what the kernel reports as it boots (the console UART,
both CPUs, the clock from the CMOS RTC, the CPUID bits the nested host needs
cleared), that it stays up under the spinning init, and that SIGTERM then
stops the VM cleanly with status 143.

One boot serves every check (a boot costs about a minute on the nested CI
host); what busybox userspace reports is checked in test_userspace.py, and a
reboot through busybox init in test_control.py (Ctrl-Alt-Del) and
test_endings_rows.py."""
import signal
import time

import pytest

from guest import run_kvmkit

pytestmark = pytest.mark.kvm

SETTLE = 5          # seconds the kernel must stay up after starting /init


@pytest.fixture(scope="module")
def boot(guest_kit):
    observed = {}

    def stop_later(proc):
        time.sleep(SETTLE)
        observed["alive_after_init"] = proc.poll() is None
        proc.send_signal(signal.SIGTERM)

    result = run_kvmkit(["run", "--kernel", str(guest_kit["SMALL_VMLINUX"]),
                         "--initrd", str(guest_kit["SPIN_CPIO"]), "--vcpus", "2",
                         "--append", "console=ttyS0 panic=-1"],
                        timeout=900, when=r"Run /init as init process", then=stop_later)
    print(result.describe())
    return result, observed


def test_kernel_stays_up_under_the_spinning_init(boot):
    result, observed = boot
    assert result.find(r"Run /init as init process"), result.describe()
    assert observed.get("alive_after_init") is True, result.describe()
    assert not result.find(r"Kernel panic"), result.describe()


def test_sigterm_stops_the_vm_cleanly(boot):
    result, _ = boot
    assert result.returncode == 143, result.describe()
    assert "stopped by SIGTERM" in result.stderr
    assert "Traceback" not in result.stderr


def test_kernel_banner(boot):
    result, _ = boot
    assert result.find(r"Linux version 6\.1\."), result.describe()


def test_console_is_a_16550a(boot):
    result, _ = boot
    assert result.find(r"ttyS0 at I/O 0x3f8 \(irq = 4, base_baud = 115200\) is a 16550A"), result.describe()


def test_two_cpus_brought_up(boot):
    result, _ = boot
    assert result.find(r"smp: Brought up 1 node, 2 CPUs"), result.describe()


def test_rtc_sets_the_clock_to_host_time(boot):
    result, _ = boot
    found = result.find(r"setting system clock to (\S+) UTC \((\d+)\)")
    assert found, result.describe()
    host_time, m = found
    assert abs(int(m.group(2)) - host_time) < 5, (m.group(0), time.ctime(host_time))


def test_cpuid_bits_cleared_on_the_nested_host(boot, on_pvm_host):
    if not on_pvm_host:
        pytest.skip("host quirks are only active on a paravirtual nested KVM host")
    from kvmkit.hypervisor.host_quirks import CLEARCPUID
    result, _ = boot
    found = result.find(r"Clearing CPUID bits: (.*)")
    assert found, result.describe()
    cleared = set(found[1].group(1).split())
    assert set(CLEARCPUID.split(",")) <= cleared, cleared
