"""virtio-fs under KVM: the guest kernel mounts a host directory as its root
file system (``rootfstype=virtiofs root=TAG``) and runs /init from it.

The share is built in a tmp dir: a static busybox, a small /init script and
a file of random bytes.  The guest hashes the host's file and prints the
hash, copies it, writes files, a directory, a rename, a hard link and a
symlink, reads its /proc/mounts, then reboots; the host then checks every
file the guest wrote.  One boot, all the checks.  Needs guest userspace:
the kit's recipe-2 kernels on this nested host (HOST-NOTES "Guest userspace"),
any kit kernel on real KVM.
"""
import hashlib
import os
import shutil
import stat

import pytest

import guest
from guest import run_kvmkit

pytestmark = pytest.mark.kvm

TAG = "kvmkit-root"
IN_SIZE = 192 * 1024
LINES = 3000

INIT = f"""#!/bin/busybox sh
b=/bin/busybox
$b mount -t proc proc /proc
echo "kvmkit-guest: mounts $($b grep ' / ' /proc/mounts)"
echo "kvmkit-guest: in $($b sha256sum /in.bin)"
$b cp /in.bin /copy.bin
$b seq 1 {LINES} > /lines.txt
$b mkdir /newdir
echo hello > /newdir/f
$b mv /newdir/f /newdir/g
$b ln /newdir/g /newdir/hard
$b ln -s g /newdir/soft
$b rm /scratch
echo "kvmkit-guest: copy $($b sha256sum /copy.bin)"
echo "kvmkit-guest: ls $($b ls /newdir | $b tr '\\n' ' ')"
$b sync
echo "kvmkit-guest: done"
$b reboot -f
"""


def _recipe() -> int:
    stamp = guest.cache_dir() / "kernels" / "small" / "stamp"
    try:
        fields = dict(f.split("=", 1) for f in stamp.read_text().split() if "=" in f)
        return int(fields.get("recipe", "0"))
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def fs_boot(guest_kit, on_pvm_host, tmp_path_factory):
    if on_pvm_host and _recipe() < 2:
        pytest.skip("guest userspace needs the kit's recipe-2 (patched) kernels on this nested "
                    "host: rebuild the kit (guest/build-kit)")
    busybox = shutil.which("busybox") or "/bin/busybox"
    d = tmp_path_factory.mktemp("virtio-fs")
    share = d / "root"
    for sub in ("bin", "proc", "dev"):
        (share / sub).mkdir(parents=True)
    shutil.copy(busybox, share / "bin" / "busybox")
    (share / "init").write_text(INIT)
    os.chmod(share / "init", 0o755)
    blob = os.urandom(IN_SIZE)
    (share / "in.bin").write_bytes(blob)
    (share / "scratch").write_text("the guest removes this")
    m = guest.machine_file(
        d / "fs.toml", image=guest_kit["SMALL_VMLINUX"], name="virtiofs",
        cmdline=f"console=ttyS0 panic=-1 reboot=k rootfstype=virtiofs root={TAG} rw init=/init",
        extra_devices=[{"kind": "virtio-fs", "path": str(share), "tag": TAG}])
    result = run_kvmkit(["run", str(m)], timeout=1500)   # 826 s measured on a loaded 2-CPU host
    print(result.describe())
    return result, share, blob


def test_guest_runs_init_from_the_virtiofs_root(fs_boot):
    result, _, _ = fs_boot
    got = result.find(r"kvmkit-guest: mounts (\S+) / (\S+) ")
    assert got, result.describe()
    assert got[1].group(1, 2) == (TAG, "virtiofs")
    assert result.find(r"kvmkit-guest: done"), result.describe()
    assert result.returncode == 0, result.describe()          # reboot -f with reboot=k


def test_guest_reads_the_host_file(fs_boot):
    result, _, blob = fs_boot
    got = result.find(r"kvmkit-guest: in ([0-9a-f]{64})")
    assert got, result.describe()
    assert got[1].group(1) == hashlib.sha256(blob).hexdigest()


def test_host_sees_what_the_guest_wrote(fs_boot):
    result, share, blob = fs_boot
    copy = result.find(r"kvmkit-guest: copy ([0-9a-f]{64})")
    assert copy and copy[1].group(1) == hashlib.sha256(blob).hexdigest(), result.describe()
    assert (share / "copy.bin").read_bytes() == blob
    assert (share / "lines.txt").read_text() == "".join(f"{i}\n" for i in range(1, LINES + 1))
    assert (share / "newdir" / "g").read_text() == "hello\n"
    assert not (share / "newdir" / "f").exists() and not (share / "scratch").exists()
    assert os.stat(share / "newdir" / "hard").st_ino == os.stat(share / "newdir" / "g").st_ino
    assert stat.S_ISLNK(os.lstat(share / "newdir" / "soft").st_mode)
    assert os.readlink(share / "newdir" / "soft") == "g"
    listed = result.find(r"kvmkit-guest: ls (.*)")
    assert listed and listed[1].group(1).split() == ["g", "hard", "soft"]
