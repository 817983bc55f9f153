"""A guest whose /init spins without ever making a system call keeps its
kernel up (on every host); SIGTERM then stops the VM cleanly with status 143."""
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
