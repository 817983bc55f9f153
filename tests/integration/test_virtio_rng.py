"""Third-party plugins under KVM: the example virtio-rng device feeds the guest
kernel's random pool, and the alternative RTC (rtc-fixed) sets the guest's
clock to its fixed start, asserted on what the guest kernel prints.

The kernel is built with RANDOM_TRUST_CPU and RANDOM_TRUST_BOOTLOADER off
(tinyconfig), so its pool is only ready ("crng init done") once enough
entropy has been credited; virtio-rng's hwrng thread credits it within a
second of the driver binding.  The spinning /init keeps the kernel up until
SIGTERM stops the VM, once the guest has printed both the pool's and the
clock's lines.
"""
import datetime
import re
import signal
import threading
import time

import pytest

from guest import machine_file, run_kvmkit
from requirement import need_module

pytestmark = pytest.mark.kvm

SETTLE = 1.0                # seconds between the last awaited line and SIGTERM
AWAITED = ("crng init done", "setting system clock")   # the lines the tests read
FIXED_START = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)   # rtc-fixed's start


@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    for module in ("kvmkit_example_virtio_rng", "kvmkit_rtc_fixed"):
        need_module(module)
    d = tmp_path_factory.mktemp("rng")
    m = machine_file(d / "rng.toml", name="virtio-rng-example", image=guest_kit["SMALL_VMLINUX"],
                     initrd=guest_kit["SPIN_CPIO"], cmdline="console=ttyS0 panic=-1",
                     devices=[{"kind": "serial8250"},
                              {"kind": "rtc-fixed", "start": FIXED_START.isoformat()},
                              {"kind": "i8042"},
                              {"kind": "virtio-rng", "max_bytes_per_request": 64}])

    # Stop once the guest has printed both lines the tests read.  Their order
    # is not fixed: under load virtio-rng seeded the pool before the RTC set
    # the clock, and a stop 1 s after "crng init done" came before the clock.
    awaited = set(AWAITED)
    lock = threading.Lock()

    def saw(line):
        def fn(proc):
            with lock:
                awaited.discard(line)
                if awaited:
                    return
            time.sleep(SETTLE)
            proc.send_signal(signal.SIGTERM)
        return fn

    result = run_kvmkit(["-v", "run", str(m)], timeout=900,
                        triggers=[(re.escape(line), saw(line)) for line in AWAITED])
    print(result.describe())
    return result


def test_guest_finds_the_virtio_entropy_device_on_pci(boot):
    assert boot.find(r"pci 0000:00:[0-9a-f]{2}\.0: \[1af4:1044\] type 00 class 0x00ff00"), boot.describe()


def test_guest_random_pool_is_seeded_from_it(boot):
    assert boot.find(r"random: crng init done"), boot.describe()
    served = re.search(r"virtio-rng\.0: served (\d+) requests, (\d+) bytes", boot.stderr)
    assert served and int(served.group(1)) >= 1 and int(served.group(2)) >= 32, boot.stderr


def test_requests_are_capped_by_the_key(boot):
    served = re.search(r"served (\d+) requests, (\d+) bytes", boot.stderr)
    assert served and int(served.group(2)) <= 64 * int(served.group(1)), boot.stderr


def test_alternative_rtc_gives_the_fixed_start_time(boot):
    found = boot.find(r"setting system clock to (\S+) UTC")
    assert found, boot.describe()
    # The fixed clock runs from the VM's start: the guest reads the start plus
    # at most the time kvmkit has run (over a minute on a loaded host).
    read = datetime.datetime.fromisoformat(found[1].group(1) + "+00:00")
    assert 0 <= (read - FIXED_START).total_seconds() <= boot.wall, (found[1].group(0), boot.wall)


def test_sigterm_ends_it(boot):
    assert boot.returncode == 143, boot.describe()
    assert "Traceback" not in boot.stderr
