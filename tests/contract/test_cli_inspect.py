"""`kvmkit plugins` and `kvmkit check`: driven by the installed plugins' schemas,
no VM, one clear line and status 2 for bad input."""
import json
import os
import subprocess
import sys

import pytest

from fake_kernels import bzimage_kernel, elf_kernel
from kvmkit import catalog
from kvmkit.cli import main
from kvmkit.plugins import installed_kinds, load_kinds, new_manager


@pytest.fixture
def machine(tmp_path):
    """machine(body, kernel="elf") -> path of a machine file next to a kernel named 'vmlinux'."""
    def make(body="", kernel="elf", name="m.toml"):
        if kernel == "elf":
            elf_kernel(tmp_path / "vmlinux")
        elif kernel == "bzimage":
            bzimage_kernel(tmp_path / "vmlinux")
        path = tmp_path / name
        path.write_text(f'[machine]\nname = "box"\nmemory = "512M"\nvcpus = 2\n'
                        f'[kernel]\nimage = "vmlinux"\n{body}')
        return path
    return make


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kvmkit: error: "), err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- kvmkit plugins ------------------------------------------------------------------------
def test_plugins_lists_every_installed_kind_with_distribution_and_keys(capsys):
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    for kind, ep in installed_kinds().items():
        assert f"{kind}  ({ep.dist.name} {ep.dist.version})" in out
    assert "MC146818 CMOS real-time clock" in out
    assert "- port (int, default 112 (0x70), range 0..65534): index port" in out
    assert '- backend (string, default "stdio", one of stdio | file | socket)' in out


def test_plugins_json_is_the_schema(capsys):
    code, out, _ = run(capsys, "plugins", "--json")
    assert code == 0
    listed = {e["kind"]: e for e in json.loads(out) if "error" not in e}  # broken: see test_broken_plugins
    assert set(listed) <= set(installed_kinds()) and "rtc" in listed
    loaded = load_kinds(new_manager(), list(listed))
    for kind, entry in listed.items():
        spec = loaded[kind].spec
        assert entry["summary"] == spec.summary
        assert entry["distribution"] == loaded[kind].distribution
        assert entry["keys"] == [catalog.describe_key(k) for k in spec.keys]
    port = listed["rtc"]["keys"][0]
    assert port == {"name": "port", "type": "int", "required": False, "default": 0x70,
                    "min": 0, "max": 0xFFFE, "doc": "index port; the data port follows it"}


def test_plugins_json_marks_required_and_optional_keys(capsys):
    if "virtio-blk" not in installed_kinds():
        pytest.skip("kvmkit-virtio-blk is not installed")
    _, out, _ = run(capsys, "plugins", "--json", "virtio-blk", "serial8250")
    listed = {e["kind"]: {k["name"]: k for k in e["keys"]} for e in json.loads(out)}
    assert listed["virtio-blk"]["path"]["required"] is True
    assert "default" not in listed["virtio-blk"]["path"]
    assert listed["serial8250"]["irq"]["default"] is None
    assert listed["serial8250"]["backend"]["choices"] == ["stdio", "file", "socket"]


def test_plugins_filters_by_kind(capsys):
    code, out, _ = run(capsys, "plugins", "rtc")
    assert code == 0 and out.startswith("rtc  (kvmkit-rtc ") and "serial8250" not in out


def test_plugins_unknown_kind_is_one_line(capsys):
    code, _, err = run(capsys, "plugins", "floppy")
    assert code == 2
    one_error(err, "unknown device kind 'floppy'", "installed kinds:")


def test_format_default_writes_toml_values():
    from pathlib import Path
    from kvmkit.plugin_api import Key, Size
    assert catalog.format_default(Key("a", int)) == "required"
    assert catalog.format_default(Key("a", Path, None)) == "optional"
    assert catalog.format_default(Key("a", bool, False)) == "default false"
    assert catalog.format_default(Key("a", Size, Size(1 << 20))) == "default 1048576 (0x100000)"
    assert catalog.format_default(Key("a", list, ("x",))) == "default ['x']"
    assert catalog.describe_key(Key("a", Path, Path("/x"), "d"))["default"] == "/x"


# -- kvmkit check -----------------------------------------------------------------------------
def test_check_ok_line(machine, capsys):
    m = machine('[[device]]\nkind = "rtc"\n[[device]]\nkind = "i8042"\n')
    code, out, err = run(capsys, "check", str(m))
    assert (code, err) == (0, "")
    assert out == "ok: box: 2 vCPUs, 512M memory, ELF vmlinux kernel, devices: rtc, i8042\n"


def test_check_bzimage_and_no_devices(machine, capsys):
    code, out, _ = run(capsys, "check", str(machine(kernel="bzimage")))
    assert code == 0 and "bzImage kernel, devices: none" in out


def test_check_applies_the_run_flags(machine, capsys):
    m = machine('[[device]]\nkind = "rtc"\n')
    code, out, _ = run(capsys, "check", str(m), "--vcpus", "4", "--memory", "1G", "--name", "other",
                       "--device", "i8042,irq=1")
    assert code == 0
    assert out == "ok: other: 4 vCPUs, 1G memory, ELF vmlinux kernel, devices: rtc, i8042\n"


def test_check_without_a_machine_file_uses_the_defaults(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    elf_kernel(tmp_path / "k")
    code, out, _ = run(capsys, "check", "--kernel", "k")
    assert code == 0 and out.startswith("ok: kvmkit: 1 vCPU, 256M memory, ELF vmlinux kernel")


@pytest.mark.parametrize("body, flags, needles", [
    ('[[device]]\nkind = "floppy"\n', [], ["unknown device kind 'floppy'", "installed kinds:"]),
    ('[[device]]\nkind = "rtc"\nport = "seventy"\n', [], ["device[0] (rtc)", "port", "expected an integer"]),
    ('[[device]]\nkind = "rtc"\ncolour = 1\n', [], ["device[0] (rtc)", "unknown key 'colour'"]),
    ('', ["--device", "rtc,irq=99"], ["device[0] (rtc)", "irq", "above the maximum 23"]),
    ('', ["--vcpus", "0"], ["[machine] vcpus"]),
    ('initrd = "nope.cpio"\n', [], ["[kernel] initrd", "nope.cpio not found"]),
])
def test_check_bad_input_is_one_line(machine, capsys, body, flags, needles):
    m = machine(body)
    code, _, err = run(capsys, "check", str(m), *flags)
    assert code == 2
    one_error(err, *needles)


def test_check_missing_kernel(machine, capsys):
    m = machine(kernel=None)
    code, _, err = run(capsys, "check", str(m))
    assert code == 2
    one_error(err, str(m), "[kernel] image", "vmlinux not found")


def test_check_kernel_that_is_not_a_kernel(machine, capsys):
    m = machine(kernel=None)
    (m.parent / "vmlinux").write_bytes(b"#!/bin/sh\necho not a kernel\n")
    code, _, err = run(capsys, "check", str(m))
    one_error(err, "[kernel] image", "neither an ELF vmlinux nor a bzImage")
    assert code == 2


def test_check_truncated_elf_names_the_loader_problem(machine, capsys):
    m = machine()
    kernel = m.parent / "vmlinux"
    kernel.write_bytes(kernel.read_bytes()[:0x800])
    code, _, err = run(capsys, "check", str(m))
    assert code == 2
    one_error(err, "[kernel] image", "runs past the end of the file")


def test_check_old_bzimage_protocol(machine, capsys):
    m = machine(kernel=None)
    bzimage_kernel(m.parent / "vmlinux", version=0x0204)
    code, _, err = run(capsys, "check", str(m))
    assert code == 2
    one_error(err, "boot protocol 2.04 is too old")


def test_check_empty_and_unreadable_initrd(machine, capsys):
    m = machine('initrd = "rd"\n')
    (m.parent / "rd").write_bytes(b"")
    code, _, err = run(capsys, "check", str(m))
    assert code == 2
    one_error(err, "[kernel] initrd", "is empty")
    (m.parent / "rd").unlink()
    (m.parent / "rd").mkdir()
    code, _, err = run(capsys, "check", str(m))
    one_error(err, "[kernel] initrd", "is not a file")


def test_check_never_opens_dev_kvm(machine, capsys, monkeypatch):
    from kvmkit.hypervisor import kvm
    real_open = os.open

    def guarded_open(path, *args, **kwargs):
        assert os.path.basename(str(path)) != "kvm", f"kvmkit check opened {path}"
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(kvm.Kvm, "__init__", lambda *a, **k: pytest.fail("Kvm() was created"))
    code, out, _ = run(capsys, "check", str(machine('[[device]]\nkind = "rtc"\n')))
    assert code == 0 and out.startswith("ok: box:")


def test_check_as_a_command(machine):
    m = machine('[[device]]\nkind = "rtc"\n')
    r = subprocess.run([sys.executable, "-m", "kvmkit", "check", str(m)], capture_output=True,
                       text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == "ok: box: 2 vCPUs, 512M memory, ELF vmlinux kernel, devices: rtc\n"


def test_plugins_markdown_is_a_readme_key_table(capsys):
    code, out, _ = run(capsys, "plugins", "--markdown", "rtc")
    assert code == 0
    lines = out.splitlines()
    assert lines[:4] == ["### `rtc`", "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    assert lines[4] == "| `port` | int | `112` (0x70) | index port; the data port follows it |"
    assert len(lines) == 4 + 3


def test_plugins_markdown_marks_required_keys_and_choices(capsys):
    if "virtio-blk" not in installed_kinds():
        pytest.skip("kvmkit-virtio-blk is not installed")
    _, out, _ = run(capsys, "plugins", "--markdown", "virtio-blk")
    assert "| `path` | path | required |" in out
    assert "(one of `writeback`, `none`) |" in out


# -- queue backends ---------------------------------------------------------------------------
@pytest.fixture
def virtio_blk_machine(machine, tmp_path):
    pytest.importorskip("kvmkit_virtio_blk", reason="kvmkit-virtio-blk is not installed")
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))

    def make(queue=None):
        line = f'queue = "{queue}"\n' if queue else ""
        return machine(f'[[device]]\nkind = "virtio-blk"\npath = "disk.img"\n{line}')
    return make


def test_check_names_each_virtio_devices_queue_backend(virtio_blk_machine, capsys):
    from kvmkit.virtio.backends import resolve
    auto = resolve("auto", "test").name
    for queue, shown in ((None, auto), ("auto", auto), ("python", "python")):
        code, out, _ = run(capsys, "check", str(virtio_blk_machine(queue)))
        assert code == 0 and out.endswith(f"devices: virtio-blk ({shown} queues)\n"), out


def test_check_native_queue_without_kvmkit_native_is_one_line(virtio_blk_machine, capsys,
                                                               monkeypatch):
    from kvmkit.virtio import backends
    monkeypatch.setattr(backends, "_entry_points", lambda: {})       # not installed
    code, _, err = run(capsys, "check", str(virtio_blk_machine("native")))
    assert code == 2
    one_error(err, "device[0] (virtio-blk): queue", '"native"', "not installed",
              "pip install ./native", 'queue = "python"')


def test_check_unknown_queue_backend_lists_the_installed_ones(virtio_blk_machine, capsys):
    code, _, err = run(capsys, "check", str(virtio_blk_machine("turbo")))
    assert code == 2
    one_error(err, "queue = 'turbo' is not an installed queue backend", "python")
