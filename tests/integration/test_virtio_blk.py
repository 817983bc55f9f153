"""virtio-blk under KVM, asserted on what guest programs report and on the
images afterwards.

Boot 1: two disks.  The guest's busybox writes a file of random bytes
through ext4 on the first (journal-less, so the host can check it), syncs,
remounts and reads it back; on the second, whose MBR was written here on the
host, it writes random bytes straight to partition 2.  The host then finds
the same bytes in both images.  Boot 2: a read-only disk: the guest reads a
host-made file from it, and its attempts to write are refused.

Both boots run once per queue backend: the C engine of kvmkit-native (MSI-X
in boot 1, INTx with a resampling irqfd in boot 2, ``pci=nomsi``) and the
pure-Python queue.
"""
import re
import struct
import subprocess
import time

import pytest

import hashlib
import os
import secrets

from guest import initrd_with_hooks, machine_file, run_kvmkit, seeded_bytes
from requirement import need_module

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


def machine(path, image, cmdline, disks, initrd=None):
    """``disks``: (image path, extra keys) of each virtio-blk disk."""
    return machine_file(path, image=image, cmdline=cmdline, initrd=initrd,
                        extra_devices=[{"kind": "virtio-blk", "path": d, **extra} for d, extra in disks])


VDB2_START = 18432                              # sectors
RAW_KIB = 256

TWO_DISKS_HOOK = r"""#!/bin/sh
say() { echo "kvmkit-guest: $*"; }
mount -t ext4 /dev/vda /mnt && say "mounted"
kvmkit-rand @FILE_SEED@ 1048576 > /mnt/guest.bin
sync
say "written $(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
umount /mnt && mount -t ext4 /dev/vda /mnt
say "readback $(sha256sum /mnt/guest.bin | cut -d' ' -f1)"
umount /mnt && say "unmounted"
say "partitions $(awk '$4 ~ /^vd/ {printf "%s ", $4}' /proc/partitions)"
kvmkit-rand @RAW_SEED@ $((@RAW_KIB@ * 1024)) > /tmp/raw
dd if=/tmp/raw of=/dev/vdb2 bs=64k conv=fsync 2>/dev/null && say "raw-written $(sha256sum /tmp/raw | cut -d' ' -f1)"
echo 3 > /proc/sys/vm/drop_caches
say "raw-readback $(dd if=/dev/vdb2 bs=1k count=@RAW_KIB@ 2>/dev/null | sha256sum | cut -d' ' -f1)"
""".replace("@RAW_KIB@", str(RAW_KIB))

READONLY_HOOK = r"""#!/bin/sh
say() { echo "kvmkit-guest: $*"; }
mount -t ext4 -o ro /dev/vda /mnt && say "mounted-ro"
say "hostfile $(sha256sum /mnt/host.bin | cut -d' ' -f1)"
mount -o remount,rw /mnt 2>/dev/null && say "remount-rw allowed" || say "remount-rw refused"
dd if=/dev/zero of=/dev/vda bs=4k count=1 conv=fsync 2>/dev/null && say "raw-write allowed" || say "raw-write refused"
say "ro-flag $(cat /sys/block/vda/ro)"
umount /mnt
"""


def facts(result) -> dict[str, str]:
    out = {}
    for _, line in result.lines:
        m = re.search(r"kvmkit-guest: (\S+) ?(.*)$", line)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


BACKENDS = ("native", "python")


def queue_param(request) -> str:
    if request.param == "native":
        need_module("kvmkit_native", "kvmkit-native")
    return request.param


@pytest.fixture(scope="module", params=BACKENDS)
def two_disks(guest_kit, tmp_path_factory, request):
    queue = queue_param(request)
    d = tmp_path_factory.mktemp(f"blk-{queue}")
    root, data = d / "root.img", d / "data.img"
    make_ext4(root, 64, "kvmkit-root")
    make_partitioned(data, 32, [(2048, 16384, 0x83), (VDB2_START, 43008, 0x83)])
    seeds = {"file": secrets.randbits(63), "raw": secrets.randbits(63)}   # the guest's random bytes
    hook = TWO_DISKS_HOOK.replace("@FILE_SEED@", str(seeds["file"])).replace("@RAW_SEED@", str(seeds["raw"]))
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"two-disks": hook})
    m = machine(d / "two.toml", guest_kit["SMALL_VMLINUX"], "console=ttyS0 panic=-1 reboot=k",
                [(root, {"queue": queue}), (data, {"queue": queue})], initrd=initrd)
    started = time.time()
    result = run_kvmkit(["-v", "run", str(m)], timeout=900)
    print(result.describe())
    return result, root, started, queue, data, seeds


def test_queue_backend_is_the_one_asked_for(two_disks):
    result, _, _, queue, _, _ = two_disks
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


def test_guest_file_reads_back_and_is_in_the_image(two_disks):
    result, root, *_, seeds = two_disks
    f = facts(result)
    assert "mounted" in f and "unmounted" in f, result.describe()
    assert f.get("readback") == f.get("written") and f.get("written"), result.describe()
    assert f["written"] == hashlib.sha256(seeded_bytes(seeds["file"], 1 << 20)).hexdigest()
    data = subprocess.run(["debugfs", "-R", "cat /guest.bin", str(root)], capture_output=True, check=True).stdout
    assert len(data) == 1 << 20 and hashlib.sha256(data).hexdigest() == f["written"]


def test_raw_partition_write_lands_at_the_partition_offset(two_disks):
    result, _, _, _, data, seeds = two_disks
    f = facts(result)
    assert f.get("partitions", "").split() == ["vda", "vdb", "vdb1", "vdb2"], result.describe()
    assert f.get("raw-written") and f.get("raw-readback") == f["raw-written"], result.describe()
    assert f["raw-written"] == hashlib.sha256(seeded_bytes(seeds["raw"], RAW_KIB * 1024)).hexdigest()
    with open(data, "rb") as img:
        img.seek(VDB2_START * 512)
        on_disk = img.read(RAW_KIB * 1024)
    assert hashlib.sha256(on_disk).hexdigest() == f["raw-written"]


def test_guest_ends_with_reset(two_disks):
    result, *_ = two_disks
    assert result.returncode == 0, result.describe()


def test_interrupts_went_through_msix(two_disks):
    result, *_ = two_disks
    assert "virtio-blk.0: MSI-X enabled" in result.stderr, result.stderr


def test_image_is_consistent_and_records_the_guest_mounts(two_disks):
    _, root, started, _, _, _ = two_disks
    check = subprocess.run(["e2fsck", "-fn", str(root)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    header = subprocess.run(["dumpe2fs", "-h", str(root)], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in header.splitlines() if ":" in line)
    assert int(fields["Mount count"]) == 2          # mounted, then remounted to read back
    mounted = time.mktime(time.strptime(fields["Last mount time"].strip(), "%a %b %d %H:%M:%S %Y"))
    assert mounted >= started - 120            # the guest's RTC-derived clock, within slack


@pytest.fixture(scope="module", params=BACKENDS)
def readonly_disk(guest_kit, tmp_path_factory, request):
    queue = queue_param(request)
    d = tmp_path_factory.mktemp(f"blk-ro-{queue}")
    src = d / "src"
    src.mkdir()
    host_bin = os.urandom(200 * 1024)
    (src / "host.bin").write_bytes(host_bin)
    disk = d / "ro.img"
    with open(disk, "wb") as f:
        f.truncate(32 * MIB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-d", str(src), str(disk)], check=True)
    before = disk.read_bytes()
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"readonly": READONLY_HOOK})
    # pci=nomsi: this boot exercises the INTx path (ISR status + level interrupt)
    m = machine(d / "ro.toml", guest_kit["SMALL_VMLINUX"], "console=ttyS0 panic=-1 reboot=k pci=nomsi",
                [(disk, {"readonly": True, "queue": queue})], initrd=initrd)
    result = run_kvmkit(["-v", "run", str(m)], timeout=900)
    print(result.describe())
    return result, disk, before, hashlib.sha256(host_bin).hexdigest()


def test_guest_reads_a_host_file_from_a_readonly_disk(readonly_disk):
    result, _, _, sha = readonly_disk
    f = facts(result)
    assert "mounted-ro" in f and f.get("hostfile") == sha, result.describe()
    assert result.returncode == 0, result.describe()


def test_guest_cannot_write_a_readonly_disk(readonly_disk):
    result, *_ = readonly_disk
    f = facts(result)
    assert f.get("ro-flag") == "1", result.describe()
    assert f.get("remount-rw") == "refused" and f.get("raw-write") == "refused", result.describe()


def test_intx_path_without_msi(readonly_disk):
    result, *_ = readonly_disk
    assert result.find(r"\[vda\] 65536 512-byte logical blocks"), result.describe()
    assert "MSI-X enabled" not in result.stderr
    if "virtqueues: native (" in result.stderr:
        assert "the request queue runs on the native engine's C thread (INTx)" in result.stderr


def test_readonly_image_is_untouched(readonly_disk):
    _, disk, before, _ = readonly_disk
    assert disk.read_bytes() == before
