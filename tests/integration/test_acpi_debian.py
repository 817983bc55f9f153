"""Debian's stock cloud kernel (no MP-table support) on 2 vCPUs through ACPI.

On real KVM this takes seconds and the test is required.  On the nested CI
host the stock kernel runs through the instruction emulator for minutes
before its CPUs come up (../shared/HOST-NOTES.md), so there it is marked slow
and opt-in (``--run-slow``).  It stops the VM as soon as the second CPU is up.
"""
import signal

import pytest

from guest import machine_file, run_kvmkit
from kvmkit.hypervisor import host_quirks

pytestmark = [pytest.mark.kvm] + ([pytest.mark.slow] if host_quirks.detect() else [])

SMP_UP = r"smp: Brought up 1 node, (\d+) CPUs?"


@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("debian-acpi")
    machine = machine_file(d / "debian-acpi.toml", image=guest_kit["DEBIAN_BZIMAGE"], memory="512M", vcpus=2,
                           cmdline="console=ttyS0 panic=-1 reboot=acpi")
    result = run_kvmkit(["-v", "run", str(machine)], timeout=1500, when=SMP_UP,
                        then=lambda proc: proc.send_signal(signal.SIGTERM))
    print(result.describe())
    return result


def test_debian_finds_the_acpi_tables(boot):
    assert boot.find(r"ACPI: (XSDT|FACP|APIC|DSDT) 0x0*F[0-9A-F]{4} .*KVMKIT"), boot.describe()


def test_debian_brings_up_both_cpus(boot):
    found = boot.find(SMP_UP)
    assert found and found[1].group(1) == "2", boot.describe()
