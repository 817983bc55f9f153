"""Boot without a machine file, kvmtool/QEMU style: the small kernel's bzImage,
one vCPU, the console in a file through a --device flag, and a triple-fault
reboot (``reboot=t``) that still ends kvmkit with status 0."""
import pytest

from guest import run_kvmkit

pytestmark = pytest.mark.kvm


@pytest.fixture(scope="module")
def boot(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("flags")
    log = d / "console.log"
    result = run_kvmkit([
        "-v", "run", "--kernel", str(guest_kit["SMALL_BZIMAGE"]), "--initrd", str(guest_kit["BUSYBOX_CPIO"]),
        "--append", "console=ttyS0 panic=-1 reboot=t", "--memory", "192M", "--vcpus", "1",
        "--device", f"serial8250,backend=file,path={log}"], timeout=900)
    console = log.read_text(errors="replace") if log.exists() else ""
    print(result.describe(), console[-3000:])
    return result, console


def test_console_went_to_the_file(boot):
    result, console = boot
    assert "Linux version 6.1." in console
    assert result.console.strip() == ""          # nothing on stdout: the file backend has it


def test_bzimage_payload_was_decompressed_on_the_host(boot):
    result, _ = boot
    assert "decompressed on the host" in result.stderr, result.stderr


def test_one_cpu_and_init(boot):
    _, console = boot
    assert "smp: Brought up 1 node, 1 CPU" in console
    assert "Run /init as init process" in console


def test_triple_fault_reset_exits_0(boot):
    result, console = boot
    assert result.returncode == 0, result.describe() + console[-2000:]
    assert "triple fault" in result.stderr
