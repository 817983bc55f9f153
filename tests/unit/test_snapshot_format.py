"""The snapshot directory without KVM: written whole or not at all, read
back with every check (missing, truncated, foreign, another version, memory
of the wrong size), and `kvmkit run --restore` answering bad input with one
line and status 2 before anything starts."""
import json
import os
from pathlib import Path

import pytest

from kvmkit import __version__
from kvmkit.cli import main
from kvmkit.config import DeviceTable, KernelConfig, MachineConfig
from kvmkit.control import RequestError, parse_request
from kvmkit.memory import GuestMemory
from kvmkit.snapshot import disks_in
from kvmkit.snapshot_format import SnapshotError, Writer, machine_to_dict, read

MEM = 16 << 20


def config(devices=()):
    return MachineConfig("snapme", MEM, 2, KernelConfig(Path("/k/vmlinux"), None, "console=ttyS0"),
                         devices=tuple(devices), stall_timeout=3.0)


def write(path: Path, cfg=None, memory=None) -> Path:
    cfg = cfg or config()
    memory = memory or GuestMemory(MEM, backing=bytearray(MEM))
    with Writer(path) as w:
        w.memory(memory)
        w.commit({"machine": machine_to_dict(cfg), "cpu": {"tsc_khz": None, "cpuid": []},
                  "devices": [], "disks": []},
                 {"vm": {}, "vcpus": [], "devices": []})
    return path


def edit(path: Path, name: str, change) -> None:
    f = path / name
    os.chmod(f, 0o600)
    f.write_bytes(change(f.read_bytes()))


def test_a_snapshot_reads_back_with_the_machine_as_resolved(tmp_path):
    table = DeviceTable("serial8250", {"backend": "file", "path": "log"}, "m.toml: device[0]", tmp_path)
    memory = GuestMemory(MEM, backing=bytearray(MEM))
    memory.write(0x1000, b"guest bytes")
    memory.write(MEM - 8, b"the end!")
    snap = read(write(tmp_path / "s", config([table]), memory))
    c = snap.config
    assert (c.name, c.memory, c.vcpus, c.stall_timeout, c.kernel.cmdline) == \
        ("snapme", MEM, 2, 3.0, "console=ttyS0")
    assert c.kernel.image is None                  # memory holds the running kernel
    assert c.devices == (table,)
    assert snap.manifest["kvmkit_version"] == __version__
    back = GuestMemory.from_file(snap.memory_path, MEM)
    assert back.read(0x1000, 11) == b"guest bytes" and back.read(MEM - 8, 8) == b"the end!"
    assert back.read(0x200000, 4) == bytes(4)
    st = snap.memory_path.stat()
    assert st.st_blocks * 512 < MEM // 2            # zero chunks are holes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    assert all(not (p.stat().st_mode & 0o222) for p in (tmp_path / "s").iterdir())


def test_memory_mapped_from_a_snapshot_is_copy_on_write(tmp_path):
    memory = GuestMemory(MEM, backing=bytearray(MEM))
    memory.write(0, b"\xaa" * 8192)
    snap = read(write(tmp_path / "s", memory=memory))
    one = GuestMemory.from_file(snap.memory_path, MEM)
    two = GuestMemory.from_file(snap.memory_path, MEM)
    one.write(0, b"mine")
    one.zero(4096, 4096)                  # no MADV_DONTNEED here: the file's bytes would come back
    assert one.read(0, 4) == b"mine" and one.read(4096, 4) == bytes(4)
    assert two.read(0, 4) == b"\xaa" * 4 and two.read(4096, 4) == b"\xaa" * 4
    assert (snap.memory_path).read_bytes()[:4] == b"\xaa" * 4
    one.close()
    two.close()


def test_a_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "s"
    with pytest.raises(RuntimeError):
        with Writer(path) as w:
            w.memory(GuestMemory(MEM, backing=bytearray(MEM)))
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_path_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    with pytest.raises(SnapshotError, match="already exists"):
        Writer(tmp_path / "s")
    with pytest.raises(SnapshotError, match="does not exist"):
        Writer(tmp_path / "no" / "s")


BAD = {
    "missing": (lambda p: None, "does not exist"),
    "no manifest": (lambda p: (p / "s" / "manifest.json").unlink(), "manifest.json: missing"),
    "foreign": (lambda p: edit(p / "s", "manifest.json", lambda b: b'{"format": "qemu"}'),
                "not a kvmkit snapshot manifest"),
    "truncated manifest": (lambda p: edit(p / "s", "manifest.json", lambda b: b[:len(b) // 2]),
                           "not valid JSON"),
    "format version": (lambda p: edit(p / "s", "manifest.json", lambda b: json.dumps(
        dict(json.loads(b), format_version=99)).encode()), "format version 99"),
    "kvmkit version": (lambda p: edit(p / "s", "manifest.json", lambda b: json.dumps(
        dict(json.loads(b), kvmkit_version="0.0.1")).encode()), "written by kvmkit 0.0.1"),
    "truncated state": (lambda p: edit(p / "s", "state.json", lambda b: b[:-3]), "truncated"),
    "changed state": (lambda p: edit(p / "s", "state.json", lambda b: b.replace(b"[]", b"{}", 1)),
                      "do not match the manifest"),
    "truncated memory": (lambda p: os.truncate(p / "s" / "memory", MEM // 2),
                         "8388608 bytes, the snapshot's guest has 16777216"),
    "no memory": (lambda p: (p / "s" / "memory").unlink(), "no guest memory"),
    "malformed machine": (lambda p: edit(p / "s", "manifest.json", lambda b: json.dumps(
        dict(json.loads(b), machine={"name": "x"})).encode()), "\"machine\" is malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_snapshots_are_refused_with_one_line(tmp_path, case, capsys):
    spoil, message = BAD[case]
    if case != "missing":
        write(tmp_path / "s")
        os.chmod(tmp_path / "s", 0o755)
    spoil(tmp_path)
    with pytest.raises(SnapshotError, match=message):
        read(tmp_path / "s")
    assert main(["run", "--restore", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kvmkit: error: ") and message in err


@pytest.mark.parametrize("flags,message", [
    (["--memory", "1G"], "--memory cannot be given"),
    (["--vcpus", "4"], "--vcpus cannot be given"),
    (["--kernel", "/boot/vmlinuz"], "--kernel cannot be given"),
    (["--device", "rtc"], "--device cannot be given"),
    (["--set", "serial8250.0.port=0x2f8"], "'port' cannot change in a restored machine"),
    (["--set", "virtio-blk.3.path=x"], "no device 'virtio-blk.3'"),
    (["--set", "nonsense"], "write DEVICE.KEY=VALUE"),
    (["--name", "no spaces"], "is not a machine name"),
])
def test_restore_flags_that_cannot_change_are_refused(tmp_path, flags, message, capsys):
    table = DeviceTable("serial8250", {}, "m.toml: device[0]", tmp_path)
    write(tmp_path / "s", config([table]))
    assert main(["run", "--restore", str(tmp_path / "s"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_set_and_force_need_restore(capsys):
    assert main(["run", "--kernel", "/nonexistent", "--force"]) == 2
    assert "go with --restore" in capsys.readouterr().err


def test_the_snapshot_request_takes_an_absolute_path():
    req = parse_request(b'{"cmd": "snapshot", "path": "/tmp/s", "resume": true}')
    assert req["path"] == "/tmp/s" and req["resume"] is True
    for bad in (b'{"cmd": "snapshot"}', b'{"cmd": "snapshot", "path": "rel"}',
                b'{"cmd": "snapshot", "path": "/x", "resume": 1}',
                b'{"cmd": "snapshot", "path": "/x", "force": true}'):
        with pytest.raises(RequestError):
            parse_request(bad)


def test_disks_are_found_at_any_depth_of_a_device_state():
    state = {"version": 1, "virtio": [{"model": {"disk": {"path": "/d.img", "size": 512}}}],
             "device": {"disk": {"path": 3}}}
    assert disks_in(state) == [{"path": "/d.img", "size": 512}]


def test_a_disk_that_changed_size_is_refused_unless_forced(tmp_path, capsys):
    from kvmkit.snapshot import check_snapshot
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(4096))
    table = DeviceTable("virtio-blk", {"path": "disk.img"}, "m.toml: device[0]", tmp_path)
    path = write(tmp_path / "s", config([table]))
    os.chmod(path / "manifest.json", 0o600)
    manifest = json.loads((path / "manifest.json").read_bytes())
    manifest["disks"] = [{"device": "virtio-blk.0", "path": str(disk), "size": 4096}]
    (path / "manifest.json").write_text(json.dumps(manifest))
    snap = read(path)
    disk.write_bytes(bytes(8192))
    with pytest.raises(SnapshotError, match=r"virtio-blk.0: disk .*disk.img is 8192 bytes, it was "
                                            r"4096 .*--force"):
        check_snapshot(snap)
    copy = tmp_path / "copy.img"
    copy.write_bytes(bytes(4096))                  # --set virtio-blk.0.path=copy.img: that is checked
    assert main(["run", "--restore", str(path), "--set", f"virtio-blk.0.path={copy}"]) == 2
    err = capsys.readouterr().err
    assert "8192" not in err and err.count("\n") == 1, err     # got past the disk check
    assert main(["run", "--restore", str(path)]) == 2
    assert "8192 bytes" in capsys.readouterr().err


def test_the_acpi_platform_and_reset_control_come_back_with_their_timer_moved_on():
    from kvmkit import chipset
    from kvmkit.acpi import platform
    now = [100.0]
    p = platform.AcpiPlatform(lambda *a: None, clock=lambda: now[0])
    p.write(platform.PM1_EN, 2, 0x121)
    p.write(platform.OSPM, 1, 1)                       # the guest's _INI ran
    now[0] += 2.0
    saved = p.save_state()
    assert saved["timer_s"] == 2.0 and json.loads(json.dumps(saved)) == saved
    now[0] = 5000.0                                    # another process: another clock
    q = platform.AcpiPlatform(lambda *a: None, clock=lambda: now[0])
    q.restore_state(saved, elapsed_s=3.0)
    assert q.ospm_ready and q.read(platform.PM1_EN, 2) == 0x121
    assert q.read(platform.PM_TMR, 4) == int(5.0 * platform.PM_TIMER_HZ) & 0xFFFFFFFF
    r = chipset.ResetControl(lambda *a: None)
    r.write(0, 1, chipset.SYS_RST)
    s = chipset.ResetControl(lambda *a: None)
    s.restore_state(r.save_state())
    assert s.read(0, 1) == chipset.SYS_RST


def test_check_restore_checks_a_snapshot_without_starting_it(tmp_path, capsys):
    table = DeviceTable("serial8250", {}, "m.toml: device[0]", tmp_path)
    path = write(tmp_path / "s", config([table]))
    assert main(["check", "--restore", str(path)]) == 2       # no vCPU state in this one
    assert "irqchip" in capsys.readouterr().err
    assert main(["check", "--restore", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
