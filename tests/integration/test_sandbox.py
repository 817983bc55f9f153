"""`kvmkit sandbox` under KVM: the kit's small kernel boots on the host's own
/ over virtio-fs and our init runs a command.  One boot runs a --script that
does every check that does not end the guest (stdout and stderr apart, the
exit status, identity and working directory, --rwdir, --overlay-rwdir, the
read-only root); a second boot ends in a guest panic.  Each boot costs a
minute or more on the nested host.  The init is built into a tmp cache."""
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from guest import KVMKIT, kit
from requirement import need

pytestmark = pytest.mark.kvm

SCRIPT = """\
echo out
echo err >&2
echo "id $(id -u):$(id -g) pwd $(pwd)"
echo kept > "$1/kept.txt"
echo lost > "$2/lost.txt" && echo "overlay write ok: $(cat "$2/lost.txt")"
echo "overlay lower: $(cat "$2/host.txt")"
if (echo nope > "$3/nope.txt") 2>/dev/null; then echo "ro write succeeded"; else echo "ro write refused"; fi
exit 7
"""


def _recipe(kit_dir: Path) -> int:
    try:
        fields = dict(f.split("=", 1) for f in (kit_dir / "kernels/small/stamp").read_text().split()
                      if "=" in f)
        return int(fields.get("recipe", "0"))
    except (OSError, ValueError):
        return 0


@pytest.fixture(scope="module")
def small_kernel():
    """Only the small kernel: the rest of the kit is not needed here."""
    need(os.access("/dev/kvm", os.R_OK | os.W_OK), "/dev/kvm is not usable here")
    k = kit()
    need(bool(k.get("SMALL_VMLINUX")) and k["SMALL_VMLINUX"].exists(),
          "the guest kit's small kernel is not built: run guest/build-kit")
    return k


@pytest.fixture(scope="module")
def sandbox(small_kernel, on_pvm_host, tmp_path_factory):
    guest_kit = small_kernel
    if on_pvm_host and _recipe(Path(guest_kit["KVMKIT_CACHE"])) < 2:
        pytest.skip("guest userspace needs the kit's recipe-2 kernels on this nested host")
    d = tmp_path_factory.mktemp("sandbox")
    env = dict(os.environ, KVMKIT_SANDBOX_CACHE=str(d / "cache"))
    # The guest's /tmp is its own tmpfs, so the directories whose host content
    # matters live outside /tmp; --rwdir works anywhere (the init creates its mount point).
    host = Path(tempfile.mkdtemp(prefix=".kvmkit-sandbox-test-", dir=Path.home()))
    rw, ro = d / "rw", host / "ro"
    overlay = host / "overlay"
    for p in (rw, ro, overlay):
        p.mkdir()
    (overlay / "host.txt").write_text("from the host\n")
    script = d / "checks.sh"
    script.write_text(SCRIPT)

    def run(*args, timeout=1500):
        t0 = time.monotonic()
        r = subprocess.run(KVMKIT + ["sandbox", "--kernel", str(guest_kit["SMALL_VMLINUX"]),
                                     "--memory", "256M", "--vcpus", "1", *args],
                           capture_output=True, text=True, cwd=rw, env=env,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        r.wall = time.monotonic() - t0
        return r

    yield run, rw, ro, overlay
    shutil.rmtree(host, ignore_errors=True)


@pytest.fixture(scope="module")
def checks(sandbox):
    run, rw, ro, overlay = sandbox
    r = run("--rwdir", str(rw), "--overlay-rwdir", str(overlay), "--script",
            str(rw.parent / "checks.sh"), "--", str(rw), str(overlay), str(ro))
    print(f"exit {r.returncode} after {r.wall:.0f} s\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
    return r


def test_stdout_and_stderr_are_apart_and_the_status_is_the_commands(checks):
    assert checks.returncode == 7, checks.stderr
    assert checks.stdout.splitlines()[0] == "out"
    assert checks.stderr == "err\n"


def test_runs_as_you_in_your_directory(checks, sandbox):
    _, rw, _, _ = sandbox
    assert f"id {os.getuid()}:{os.getgid()} pwd {rw}" in checks.stdout.splitlines()


def test_rwdir_writes_reach_the_host(checks, sandbox):
    _, rw, _, _ = sandbox
    assert (rw / "kept.txt").read_text() == "kept\n"


def test_overlay_and_read_only_writes_do_not(checks, sandbox):
    _, _, ro, overlay = sandbox
    out = checks.stdout.splitlines()
    assert "overlay write ok: lost" in out and "overlay lower: from the host" in out
    assert not (overlay / "lost.txt").exists()
    assert "ro write refused" in out and not (ro / "nope.txt").exists()


def test_a_guest_panic_has_its_own_status(sandbox):
    run, _, _, _ = sandbox
    # init=/bin/false after ours: PID 1 exits, the kernel panics ("Attempted to
    # kill init!") and says so through pvpanic.
    r = run("--append", "init=/bin/false", "--", "true")
    print(f"exit {r.returncode} after {r.wall:.0f} s\n{r.stderr}")
    assert r.returncode == 123, r.stderr
    assert "the guest kernel panicked" in r.stderr and "Attempted to kill init" in r.stderr
