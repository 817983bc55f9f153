"""Bad input: one clear line naming the file or key, a non-zero exit, no traceback."""
import os
import subprocess
import sys
import tempfile

import pytest

from contract.fake_kernels import elf_kernel
from guest import one_error_line

KVMKIT = [sys.executable, "-m", "kvmkit"]
# Sockets of our own: a VM named "m" of another test run must not clash with these.
ENV = {**os.environ, "XDG_RUNTIME_DIR": tempfile.mkdtemp(prefix="kvmkit-bad-input-")}


def kvmkit(*args, cwd=None, env=None):
    return subprocess.run(KVMKIT + list(args), capture_output=True, text=True, cwd=cwd,
                          stdin=subprocess.DEVNULL, timeout=120, env={**ENV, **(env or {})})


def machine(tmp_path, body, name="m.toml"):
    p = tmp_path / name
    p.write_text(body)
    return p


def test_missing_kernel(tmp_path):
    m = machine(tmp_path, '[kernel]\nimage = "nope/vmlinux"\n')
    one_error_line(kvmkit("run", str(m)), str(m), "[kernel] image", "nope/vmlinux", "not found")


def test_initrd_that_is_not_a_file(tmp_path):
    elf_kernel(tmp_path / "k")                # the initrd is the one problem
    (tmp_path / "rd").mkdir()
    m = machine(tmp_path, '[kernel]\nimage = "k"\ninitrd = "rd"\n')
    one_error_line(kvmkit("run", str(m)), "[kernel] initrd", "rd")


def test_malformed_toml(tmp_path):
    m = machine(tmp_path, '[kernel\nimage = "k"\n')
    one_error_line(kvmkit("run", str(m)), str(m), "not valid TOML")


def test_unknown_device_kind_lists_installed_kinds(tmp_path):
    elf_kernel(tmp_path / "k")
    m = machine(tmp_path, '[kernel]\nimage = "k"\n[[device]]\nkind = "floppy"\n')
    line = one_error_line(kvmkit("run", str(m)), "'floppy'", "installed kinds:")
    assert "rtc" in line and "serial8250" in line


def test_bad_device_key(tmp_path):
    elf_kernel(tmp_path / "k")
    m = machine(tmp_path, '[kernel]\nimage = "k"\n[[device]]\nkind = "rtc"\nport = "seventy"\n')
    one_error_line(kvmkit("run", str(m)), str(m), "device[0] (rtc)", "port", "integer")


def test_no_kernel_and_no_machine_file_boots_the_found_kernel(tmp_path):
    # kvmtool's order: ./bzImage first; a file that is no kernel is one error line.
    (tmp_path / "bzImage").write_bytes(b"not a kernel" * 100)
    env = dict(os.environ, KVMKIT_SANDBOX_CACHE=str(tmp_path / "cache"))
    one_error_line(kvmkit("run", cwd=tmp_path, env=env), "bzImage")


def test_debug_shows_the_traceback(tmp_path):
    m = machine(tmp_path, '[kernel]\nimage = "nope"\n')
    r = kvmkit("--debug", "run", str(m))
    assert r.returncode != 0 and "Traceback" in r.stderr


@pytest.mark.kvm
def test_duplicate_port(guest_kit, tmp_path):
    m = machine(tmp_path, f'[kernel]\nimage = "{guest_kit["SMALL_VMLINUX"]}"\n'
                '[[device]]\nkind = "serial8250"\nbackend = "file"\npath = "a.log"\n'
                '[[device]]\nkind = "serial8250"\nbackend = "file"\npath = "b.log"\n')
    # found by kvmkit_check_device before the VM exists
    one_error_line(kvmkit("run", str(m)), "device[1] (serial8250)", "overlap",
                   "device[0] (serial8250)", "0x3f8", status=2)


@pytest.mark.kvm
def test_port_clash_between_two_kinds(guest_kit, tmp_path):
    m = machine(tmp_path, f'[kernel]\nimage = "{guest_kit["SMALL_VMLINUX"]}"\n'
                '[[device]]\nkind = "rtc"\n'
                '[[device]]\nkind = "serial8250"\nport = 0x70\nirq = 4\nbackend = "file"\npath = "a.log"\n')
    # each plugin checks only its own kinds: the bus finds this one when the devices are created
    one_error_line(kvmkit("run", str(m)), "device[1] (serial8250)", "overlaps rtc.0", status=2)


@pytest.mark.kvm
def test_memory_too_small_for_the_kernel(guest_kit, tmp_path):
    m = machine(tmp_path, f'[machine]\nmemory = "16M"\n[kernel]\nimage = "{guest_kit["SMALL_VMLINUX"]}"\n')
    one_error_line(kvmkit("run", str(m)), "memory too small for the kernel", "needs",
                   "machine has 16", "give the machine more memory", status=2)
