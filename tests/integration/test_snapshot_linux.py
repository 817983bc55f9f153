"""Snapshot and restore of a Linux guest in its userspace (issue 19's "done
when"): a guest program counts, writing each count to a virtio-blk disk and
to the console; it is snapshotted (`kvmkit snapshot`) and the VM killed; the
snapshot is restored twice, into two VMs running side by side, each on its
own copy of the disk.  Each goes on from the saved count, its disk writes
land, its clock has moved on by the time the snapshot waited, and the guest's
own `poweroff` (ACPI S5) ends it with status 0."""
import re
import shutil
import subprocess
import sys
import threading
import time

import pytest

from guest import KVMKIT, initrd_with_hooks, machine_file, run_kvmkit

pytestmark = pytest.mark.kvm
pytest.importorskip("kvmkit.device_state", reason="the devices' state (kvmkit.device_state) is "
                    "not in this tree")

LAST = 8                        # the guest counts to this, then powers off
SNAPSHOT_AT = 3                 # the count after which the snapshot is taken
WAIT = 5                        # seconds between the snapshot and the restores
DEADLINE = 900                  # s, each guest's: for a hung guest (loaded, a count took 30-100 s)
# On the nested paravirtual host the guest's TSC is the host's (KVM ignores
# writes to MSR_IA32_TSC there), so a restored guest's clock moves on by the
# real time since the snapshot whatever kvmkit sets.  A periodic tick kept by
# the TSC-deadline timer (one-shot mode) then replays every missed tick, each
# in KVM's instruction emulator, no faster than real time: the guest never
# catches up.  The LAPIC timer's own periodic mode has no such replay.
CMDLINE = "console=ttyS0 panic=-1 lapic=notscdeadline"
COUNT_HOOK = f"""#!/bin/sh
touch /tmp/kvmkit-no-reset
i=0
while [ $i -lt {LAST} ]; do
  i=$((i+1))
  echo "count $i" | dd of=/dev/vda bs=512 seek=$i conv=notrunc,fsync 2>/dev/null
  echo "kvmkit-count: $i date=$(date +%s)"
  sleep 1
done
echo "kvmkit-count: done"
poweroff
"""
COUNT_LINE = re.compile(r"kvmkit-count: (\d+) date=(\d+)")


def counts(result) -> list[tuple[int, int, float]]:
    """(count, the guest's date, the host's time.time() when read) per count line."""
    out = []
    for t, line in result.lines:
        m = COUNT_LINE.search(line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)), t))
    return out


def sector(disk, n: int) -> bytes:
    with open(disk, "rb") as f:
        f.seek(512 * n)
        return f.read(512).rstrip(b"\0")


@pytest.fixture(scope="module")
def restored(guest_kit, tmp_path_factory):
    d = tmp_path_factory.mktemp("snap")
    disk = d / "disk.img"
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"count": COUNT_HOOK})
    name = f"snap-e2e-{int(time.time())}"
    m = machine_file(d / "count.toml", name=name, image=guest_kit["ACPI_VMLINUX"], initrd=initrd,
                     vcpus=1, cmdline=CMDLINE,
                     devices=({"kind": "serial8250"}, {"kind": "rtc"}, {"kind": "i8042"},
                              {"kind": "virtio-blk", "path": str(disk)}))
    snap = d / "snapshot"
    took = {}

    def take(proc):
        took["at"] = time.time()
        took["snapshot"] = subprocess.run(KVMKIT + ["snapshot", name, str(snap)],
                                          capture_output=True, text=True, timeout=120)
        took["kill"] = subprocess.run(KVMKIT + ["kill", name], capture_output=True, text=True,
                                      timeout=60)

    original = run_kvmkit(["-v", "run", str(m)], timeout=DEADLINE,
                          when=rf"kvmkit-count: {SNAPSHOT_AT} ", then=take)
    print(original.describe())
    print(took)
    assert took.get("snapshot") is not None and took["snapshot"].returncode == 0, (took, original.describe())
    copies = [d / "copy-a.img", d / "copy-b.img"]
    for c in copies:
        shutil.copyfile(disk, c)
    time.sleep(max(0.0, took["at"] + WAIT - time.time()))
    results: dict[int, object] = {}

    def restore(i):
        results[i] = run_kvmkit(["-v", "run", "--restore", str(snap), "--name", f"{name}-{i}",
                                 "--set", f"virtio-blk.0.path={copies[i]}"], timeout=DEADLINE)

    took["restore_at"] = time.time()
    threads = [threading.Thread(target=restore, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(2):
        print(f"--- restored {i}\n" + results[i].describe())
    return original, took, [results[0], results[1]], copies


def test_the_snapshot_was_taken_and_the_original_killed(restored):
    original, took, _, _ = restored
    assert "snapshot" in took["snapshot"].stdout and "paused" in took["snapshot"].stdout, took
    assert original.returncode != 0, original.describe()         # killed: it never counted on
    assert counts(original)[-1][0] < LAST


@pytest.mark.parametrize("i", [0, 1])
def test_each_restored_guest_goes_on_from_the_saved_count(restored, i):
    original, _, results, _ = restored
    saved = counts(original)[-1][0]
    got = [c for c, _, _ in counts(results[i])]
    assert got == list(range(saved + 1, LAST + 1)), results[i].describe()
    assert results[i].find(r"kvmkit-count: done"), results[i].describe()


@pytest.mark.parametrize("i", [0, 1])
def test_the_guest_poweroff_ends_each_restored_vm_with_0(restored, i):
    _, _, results, _ = restored
    assert results[i].returncode == 0, results[i].describe()
    assert "guest power-off" in results[i].stderr, results[i].describe()


@pytest.mark.parametrize("i", [0, 1])
def test_each_restored_guests_disk_writes_land(restored, i):
    original, _, results, copies = restored
    for n in range(1, LAST + 1):
        assert sector(copies[i], n) == f"count {n}\n".encode(), (n, results[i].describe())


@pytest.mark.parametrize("i", [0, 1])
def test_each_restored_guests_clock_moved_on_with_the_hosts(restored, i):
    """The first date a restored guest prints is no earlier than the restore
    (seconds after the snapshot) and no later than the host's time when the
    line arrived: its clock moved on by the time the snapshot waited.  (Each
    `date` here takes seconds: fork and exec run in KVM's emulator.)"""
    original, took, results, _ = restored
    _, guest_before, _ = counts(original)[-1]
    _, guest_after, host_after = counts(results[i])[0]
    assert took["restore_at"] - took["at"] >= WAIT
    assert guest_before <= took["at"] + 1
    assert int(took["restore_at"]) <= guest_after <= host_after + 1, \
        (guest_before, guest_after, took, host_after)
