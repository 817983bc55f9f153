"""virtio-blk under KVM, asserted on what the guest kernel reports.

Boot 1: two disks, an ext4 root (no journal, so the host can check it after
an unclean end) mounted read-write, and a second disk with an MBR partition
table written here on the host.  Boot 2: a read-only disk given as the rw
root: the kernel falls back to mounting it read-only.  No initramfs: the
kernel mounts root= itself and then finds no init, panics, and resets.

Both boots run once per queue backend: the C engine of kvmkit-native (MSI-X
in boot 1, INTx with a resampling irqfd in boot 2) and the pure-Python queue.
"""
import re
import struct
import subprocess
import time

import pytest

from guest import machine_file, run_kvmkit

pytestmark = pytest.mark.kvm

MIB = 1 << 20


def make_ext4(path, size_mib, label):
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-L", label, str(path)], check=True)


def make_partitioned(path, size_mib, parts):
    """An MBR with primary partitions ``parts`` = [(start_sector, sectors, type)]."""
    mbr = bytearray(512)
    for i, (start, count, kind) in enumerate(parts):
        mbr[446 + 16 * i:446 + 16 * (i + 1)] = struct.pack("<B3sB3sII", 0, b"\xff\xff\xff", kind,
                                                           b"\xff\xff\xff", start, count)
    mbr[510:512] = b"\x55\xaa"
    with open(path, "wb") as f:
        f.truncate(size_mib * MIB)
        f.write(mbr)


def machine(path, image, cmdline, disks):
    """``disks``: (image path, extra keys) of each virtio-blk disk."""
    return machine_file(path, image=image, cmdline=cmdline,
                        extra_devices=[{"kind": "virtio-blk", "path": d, **extra} for d, extra in disks])


BACKENDS = ("native", "python")


def queue_param(request) -> str:
    if request.param == "native":
        pytest.importorskip("kvmkit_native", reason="kvmkit-native is not installed")
    return request.param


@pytest.fixture(scope="module", params=BACKENDS)
def two_disks(guest_kit, tmp_path_factory, request):
    queue = queue_param(request)
    d = tmp_path_factory.mktemp(f"blk-{queue}")
    root, data = d / "root.img", d / "data.img"
    make_ext4(root, 64, "kvmkit-root")
    make_partitioned(data, 32, [(2048, 16384, 0x83), (18432, 43008, 0x83)])
    m = machine(d / "two.toml", guest_kit["SMALL_VMLINUX"], "console=ttyS0 panic=-1 reboot=k root=/dev/vda rw",
                [(root, {"queue": queue}), (data, {"queue": queue})])
    started = time.time()
    result = run_kvmkit(["-v", "run", str(m)], timeout=900)
    print(result.describe())
    return result, root, started, queue


def test_queue_backend_is_the_one_asked_for(two_disks):
    result, _, _, queue = two_disks
    assert result.stderr.count(f"virtqueues: {queue} (") == 2, result.describe()
    assert f"; {queue} virtqueues (virtio-blk.0, virtio-blk.1)" in result.stderr   # the end line
    served = [int(n) for n in re.findall(r"the engine served (\d+) requests in C", result.stderr)]
    if queue == "native":                       # both disks' requests went through the C thread
        assert result.stderr.count("the request queue runs on the native engine's C thread "
                                   "(MSI-X)") == 2, result.describe()
        assert len(served) == 2 and min(served) > 0, result.describe()
    else:
        assert not served, result.describe()


def test_disk_sizes(two_disks):
    result, *_ = two_disks
    assert result.find(r"virtio_blk virtio\d+: \[vda\] 131072 512-byte logical blocks"), result.describe()
    assert result.find(r"virtio_blk virtio\d+: \[vdb\] 65536 512-byte logical blocks"), result.describe()


def test_partitions_read_from_the_host_made_table(two_disks):
    result, *_ = two_disks
    assert result.find(r"^\[[ \d.]+\]\s+vdb: vdb1 vdb2\s*$"), result.describe()


def test_ext4_root_mounted_read_write(two_disks):
    result, *_ = two_disks
    assert result.find(r"EXT4-fs \(vda\): mounted filesystem"), result.describe()
    assert result.find(r"VFS: Mounted root \(ext4 filesystem\) on device"), result.describe()
    assert not result.find(r"Mounted root .* readonly")


def test_guest_ends_with_reset(two_disks):
    result, *_ = two_disks
    assert result.returncode == 0, result.describe()


def test_interrupts_went_through_msix(two_disks):
    result, *_ = two_disks
    assert "virtio-blk.0: MSI-X enabled" in result.stderr, result.stderr


def test_image_is_consistent_and_records_the_guest_mount(two_disks):
    _, root, started, _ = two_disks
    check = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert int(fields["Mount count"]) == 1
    mounted = time.mktime(time.strptime(fields["Last mount time"].strip(), "%a %b %d %H:%M:%S %Y"))
    assert mounted >= started - 120            # the guest's RTC-derived clock, within slack


@pytest.fixture(scope="module", params=BACKENDS)
def readonly_root(guest_kit, tmp_path_factory, request):
    queue = queue_param(request)
    d = tmp_path_factory.mktemp(f"blk-ro-{queue}")
    root = d / "ro.img"
    make_ext4(root, 32, "kvmkit-ro")
    before = root.read_bytes()
    # pci=nomsi: this boot exercises the INTx path (ISR status + level interrupt)
    m = machine(d / "ro.toml", guest_kit["SMALL_VMLINUX"],
                "console=ttyS0 panic=-1 reboot=k root=/dev/vda rw pci=nomsi",
                [(root, {"readonly": True, "queue": queue})])
    result = run_kvmkit(["-v", "run", str(m)], timeout=900)
    print(result.describe())
    return result, root, before


def test_readonly_root_falls_back_to_a_readonly_mount(readonly_root):
    result, _, _ = readonly_root
    assert result.find(r"VFS: Mounted root \(ext4 filesystem\) readonly on device"), result.describe()
    assert result.returncode == 0, result.describe()


def test_intx_path_without_msi(readonly_root):
    result, _, _ = readonly_root
    assert result.find(r"\[vda\] 65536 512-byte logical blocks"), result.describe()
    assert "MSI-X enabled" not in result.stderr
    if "virtqueues: native (" in result.stderr:
        assert "the request queue runs on the native engine's C thread (INTx)" in result.stderr


def test_readonly_image_is_untouched(readonly_root):
    _, root, before = readonly_root
    assert root.read_bytes() == before
