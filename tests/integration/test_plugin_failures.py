"""A plugin that raises during I/O stops the VM with status 1 and a message
naming it, and a virtio-blk disk the guest had mounted read-write is left
consistent (e2fsck -fn).

The faulty plugin is a throwaway distribution (on PYTHONPATH): kind
``faulty-serial``, the serial8250 plugin's UART behind a wrapper whose
transmit register raises once the console has printed the line that says
the ext4 root is mounted read-write.  It also implements the lifecycle
hooks and records their calls in a file.
"""
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from guest import run_kvmkit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "contract"))
from distributions import write_distribution  # noqa: E402

pytestmark = pytest.mark.kvm

TRIGGER = "VFS: Mounted root (ext4 filesystem) on device"

FAULTY = '''
from pathlib import Path
from kvmkit.plugin_api import DeviceConfig, DevicePlugin, DeviceSpec, Key, hookimpl
from kvmkit_serial8250.plugin import SPEC as SERIAL_SPEC, SerialPort

SPEC = DeviceSpec("faulty-serial", "a 16550A whose transmit register fails after a trigger line",
                  SERIAL_SPEC.keys + (Key("trigger", str, "", "the console line after which THR raises"),
                                      Key("record", str, "", "file the lifecycle hooks append to")))


class Faulty:
    """Forwards to the UART; once the trigger line is complete, writes raise."""
    def __init__(self, uart, trigger):
        self.uart, self.trigger, self.seen, self.armed = uart, trigger.encode(), bytearray(), False
    def read(self, offset, size):
        return self.uart.read(offset, size)
    def write(self, offset, size, value):
        if offset == 0 and self.armed:
            raise RuntimeError("injected fault after the trigger line")
        self.uart.write(offset, size, value)
        if offset == 0:
            self.seen += bytes([value & 0xFF])
            if self.trigger in self.seen and self.seen.endswith(b"\\n"):
                self.armed = True
            del self.seen[:-4096]


class WrappingContext:
    def __init__(self, ctx, trigger):
        self._ctx, self._trigger = ctx, trigger
    def __getattr__(self, name):
        return getattr(self._ctx, name)
    def add_io(self, space, base, size, handler):
        self._ctx.add_io(space, base, size, Faulty(handler, self._trigger))


def create(config, ctx):
    serial = DeviceConfig("serial8250", {k.name: config[k.name] for k in SERIAL_SPEC.keys}, config.where)
    return SerialPort(serial, WrappingContext(ctx, config["trigger"]))


def _record(vm, line):
    for table in vm.config.devices:
        if table.kind == "faulty-serial" and table.values.get("record"):
            with open(table.values["record"], "a") as f:
                f.write(line + "\\n")


class FaultyPlugin(DevicePlugin):
    @hookimpl
    def kvmkit_vm_started(self, vm):
        _record(vm, f"started {vm.config.name}")

    @hookimpl
    def kvmkit_vm_stopped(self, vm, reason, exit_code):
        _record(vm, f"stopped {exit_code} {reason}")


plugin = FaultyPlugin(SPEC, create)
'''


def make_ext4(path, size_mib):
    with open(path, "wb") as f:
        f.truncate(size_mib << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", "faulty-root", str(path)],
                   check=True)


@pytest.fixture(scope="module")
def faulty_boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("faulty")
    site = write_distribution(d / "site", "kvmkit-faulty-test", {"kvmkit_faulty_test": FAULTY},
                              {"faulty-serial": "kvmkit_faulty_test:plugin"})
    root, record = d / "root.img", d / "hooks.log"
    make_ext4(root, 32)
    m = d / "fault.toml"
    m.write_text(f"""
[machine]
name = "plugin-fault"
memory = "256M"

[kernel]
image = "{guest_kit['SMALL_VMLINUX']}"
cmdline = "console=ttyS0 panic=-1 reboot=k root=/dev/vda rw"

[[device]]
kind = "faulty-serial"
trigger = "{TRIGGER}"
record = "{record}"

[[device]]
kind = "rtc"

[[device]]
kind = "i8042"

[[device]]
kind = "virtio-blk"
path = "{root}"
""")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(site))
        result = run_kvmkit(["run", str(m)], timeout=900, when=r"Kernel panic",
                            then=lambda proc: proc.send_signal(signal.SIGTERM))
    print(result.describe())
    return result, root, record


def test_the_vm_stops_with_status_1(faulty_boot):
    result, _, _ = faulty_boot
    assert result.find(r"VFS: Mounted root \(ext4 filesystem\) on device"), result.describe()
    assert result.returncode == 1, result.describe()


def test_the_message_names_the_plugin_and_the_error(faulty_boot):
    result, _, _ = faulty_boot
    summary = [line for line in result.stderr.splitlines() if line.startswith("kvmkit: plugin-fault:")]
    assert len(summary) == 1, result.stderr
    assert "device faulty-serial.0 failed: RuntimeError: injected fault after the trigger line" \
        in summary[0], summary[0]
    assert "Traceback" not in result.stderr


def test_the_guest_never_got_past_the_fault(faulty_boot):
    result, _, _ = faulty_boot
    assert not result.find(r"Kernel panic"), result.describe()
    assert not result.find(r"Run /sbin/init|No working init"), result.describe()


def test_the_mounted_disk_is_consistent(faulty_boot):
    _, root, _ = faulty_boot
    check = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_kvmkit_vm_started_and_kvmkit_vm_stopped_ran(faulty_boot):
    _, _, record = faulty_boot
    lines = record.read_text().splitlines()
    assert lines[0] == "started plugin-fault"                         # kvmkit_vm_started
    assert lines[1].startswith("stopped 1 vCPU 0: device faulty-serial.0 failed: RuntimeError")
    assert len(lines) == 2                                     # kvmkit_vm_stopped, once
