"""Every way a Linux guest ends ends kvmkit (issue 18), with the kit's small
kernel (no ACPI) and a machine without an i8042, so no row can lean on the
keyboard controller's reset: each boot asserts what the guest printed last
and the status kvmkit ended with.  The hand-made guests in
test_guest_endings.py cover each mechanism on its own in milliseconds."""
import time

import pytest

from guest import initrd_with_hooks, machine_file, run_kvmkit

pytestmark = pytest.mark.kvm

NO_I8042 = ({"kind": "serial8250"}, {"kind": "rtc"})
HALT_HOOK = {"halt": "#!/bin/sh\necho kvmkit-guest: halting\nhalt -f\n"}

# name: (cmdline, userspace hook or None, [machine] extras, status, what the guest printed last,
#        kvmkit's reason)
ROWS = {
    "reboot=bios": ("reboot=b panic=-1", None, {}, 0, r"Kernel panic - not syncing",
                    "guest reset (port 0xCF9, hard)"),
    "reboot=pci": ("reboot=p panic=-1", None, {}, 0, r"Kernel panic - not syncing",
                   "guest reset (port 0xCF9, hard)"),
    "reboot=kbd without i8042": ("reboot=k panic=-1", None, {}, 0, r"Kernel panic - not syncing",
                                 "guest reset (port 0xCF9, hard)"),
    "halt -f": ("reboot=k panic=-1", HALT_HOOK, {}, 5, r"reboot: System halted",
                "guest halted: every vCPU stopped for good (vCPU 0 halted with interrupts off"),
    # A panicked kernel with panic=0 spins with interrupts on and exits no more;
    # without pvpanic only the stall watchdog ends it.  Its timeout must exceed
    # the boot's own silences (the console prints nothing for minutes before
    # its driver loads on the nested host), hence slow.
    "panic=0 with stall_timeout": ("panic=0", None, {"stall_timeout": 240}, 6,
                                   r"end Kernel panic - not syncing",
                                   "stalled: no vCPU exited for 240 s"),
}
# reboot=k without an i8042 ends through the same BIOS fallback as reboot=b,
# after Linux polls the absent controller for about two minutes here.
SLOW = {"panic=0 with stall_timeout", "reboot=kbd without i8042"}


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.slow)
                                        if name in SLOW else name for name in ROWS])
def ending(request, guest_kit, tmp_path_factory):
    cmdline, hook, extras, *_ = ROWS[request.param]
    d = tmp_path_factory.mktemp("ending")
    initrd = None
    if hook is not None:
        initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", hook)
    m = machine_file(d / "m.toml", image=guest_kit["SMALL_VMLINUX"], initrd=initrd,
                     cmdline=f"console=ttyS0 {cmdline}", devices=NO_I8042)
    if extras:
        text = m.read_text().replace("[machine]\n", "[machine]\n" + "".join(
            f"{k} = {v}\n" for k, v in extras.items()), 1)
        m.write_text(text)
    result = run_kvmkit(["run", str(m)], timeout=900)
    end = time.time()
    last = result.find(ROWS[request.param][4])
    took = f"{end - last[0]:.1f} s after the guest's last line" if last else "?"
    print(f"{request.param}: status {result.returncode}, {took}\n{result.describe()}")
    return request.param, result, last, end


def test_the_guest_ends_with_its_status(ending):
    name, result, last, end = ending
    _cmdline, _hook, _extras, status, _line, reason = ROWS[name]
    assert last, result.describe()                       # the guest got to its ending
    assert result.returncode == status, result.describe()
    summary = [line for line in result.stderr.splitlines() if line.startswith("kvmkit: m: ")]
    assert summary and summary[-1].startswith(f"kvmkit: m: {reason}"), result.describe()
    assert "vCPU 0 " in summary[-1], summary               # the per-vCPU counts
