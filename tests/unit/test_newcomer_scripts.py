"""What a newcomer meets in ./demo and scripts/setup when something is missing:
one line saying what and how to fix it.  The failures are simulated (fake
apt-get, sudo, dpkg-query and id first on PATH; a KVM device path that is
missing or not accessible), and every run stops before installing anything."""

from __future__ import annotations

import grp
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SETUP = ROOT / "scripts" / "setup"
DEMO = ROOT / "demo"
sys.path.insert(0, str(ROOT / "scripts"))
import checkout_installs  # noqa: E402

sys.path.pop(0)


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        f = bin_dir / name.replace("_", "-")
        f.write_text("#!/bin/sh\n" + textwrap.dedent(body))
        f.chmod(0o755)
    return bin_dir


# dpkg-query -W -f=... PACKAGE: acpica-tools is missing, the rest installed.
DPKG_QUERY = """
    for a; do p=$a; done
    if [ "$p" = acpica-tools ]; then printf 'unknown ok not-installed'; exit 0; fi
    printf 'install ok installed'
"""


def _run_setup(tmp_path: Path, bin_dir: Path, path: str | None = None):
    env = dict(os.environ, PATH=f"{bin_dir}:{path or os.environ['PATH']}",
               KVMKIT_SETUP_LOG=str(tmp_path / "setup.log"), KVMKIT_CACHE=str(tmp_path / "cache"))
    return subprocess.run([str(SETUP)], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=60)


def _path_without(tmp_path: Path, command: str) -> str:
    """A PATH of one directory that links every command on PATH but COMMAND."""
    d = tmp_path / "path"
    d.mkdir()
    for entry in os.environ["PATH"].split(":"):
        if not os.path.isdir(entry):
            continue
        for f in os.scandir(entry):
            if f.name != command and not (d / f.name).exists() and os.access(f.path, os.X_OK):
                (d / f.name).symlink_to(f.path)
    return str(d)


def test_setup_without_root_or_sudo(tmp_path):
    bin_dir = _fake_bin(tmp_path, dpkg_query=DPKG_QUERY, id='[ "$1" = -u ] && echo 1000 || exec /usr/bin/id "$@"',
                        apt_get='echo "apt-get must not run" >&2; exit 99')
    r = _run_setup(tmp_path, bin_dir, path=_path_without(tmp_path, "sudo"))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "setup: error: installing acpica-tools needs root and there is no sudo: "
        "as root run 'apt-get install acpica-tools', then run this again"], r.stderr
    assert "packages" not in r.stdout


def test_setup_when_sudo_refuses(tmp_path):
    bin_dir = _fake_bin(tmp_path, dpkg_query=DPKG_QUERY,
                        id='[ "$1" = -u ] && echo 1000 || exec /usr/bin/id "$@"',
                        sudo='echo "sudo: a password is required" >&2; exit 1',
                        apt_get='echo "apt-get must not run" >&2; exit 99')
    r = _run_setup(tmp_path, bin_dir)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "setup: error: installing acpica-tools needs root and sudo refused (sudo: a password is required): "
        "ask an administrator to run 'apt-get install acpica-tools' or run scripts/setup as root, "
        "then run this again"], r.stderr


def test_setup_when_the_package_index_is_unreachable(tmp_path):
    apt_get = """
        echo "Err:1 http://deb.debian.org/debian bookworm InRelease"
        echo "  Temporary failure resolving 'deb.debian.org'"
        echo "W: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease  Temporary failure resolving 'deb.debian.org'" >&2
        [ "$1" = update ] && exit 0
        echo "E: Unable to locate package acpica-tools" >&2
        exit 100
    """
    bin_dir = _fake_bin(tmp_path, dpkg_query=DPKG_QUERY, id='[ "$1" = -u ] && echo 0 || exec /usr/bin/id "$@"',
                        apt_get=apt_get)
    r = _run_setup(tmp_path, bin_dir)
    assert r.returncode == 1
    log = tmp_path / "setup.log"
    assert r.stderr.splitlines() == [
        "setup: error: the package index is unreachable (Temporary failure resolving 'deb.debian.org'): "
        f"check the network and the mirror or proxy in /etc/apt, then run this again (log: {log})"], r.stderr
    assert r.stdout.splitlines() == [f"setup: packages: installing acpica-tools (apt-get; log: {log})"]
    # apt's own output went to the log, not the terminal.
    assert "Unable to locate package acpica-tools" in log.read_text()


def test_setup_apt_failure_shows_the_log_tail(tmp_path):
    apt_get = """
        [ "$1" = update ] && { echo "Hit:1 http://deb.debian.org/debian bookworm InRelease"; exit 0; }
        echo "E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)" >&2
        exit 100
    """
    bin_dir = _fake_bin(tmp_path, dpkg_query=DPKG_QUERY, id='[ "$1" = -u ] && echo 0 || exec /usr/bin/id "$@"',
                        apt_get=apt_get)
    r = _run_setup(tmp_path, bin_dir)
    assert r.returncode == 1
    err = r.stderr.splitlines()
    log = tmp_path / "setup.log"
    assert "    E: Could not get lock /var/lib/dpkg/lock-frontend. It is held by process 4242 (unattended-upgr)" in err
    assert err[-1] == ("setup: error: apt-get install acpica-tools failed "
                       f"(the log's last lines are above; whole log: {log})")


def _demo(env_extra: dict, user=None, setup_rc=97):
    """Runs a copy of ./demo beside the real guest/build-kit, a scripts/setup
    that only says it ran (a demo that failed to stop cannot set anything up)
    and a .venv/bin/kvmkit that says how it was run and exits 3."""
    d = Path(tempfile.mkdtemp())
    try:
        d.chmod(0o755)
        for sub in ("guest", "scripts", ".venv/bin"):
            (d / sub).mkdir(parents=True)
        shutil.copy2(DEMO, d / "demo")
        shutil.copy2(ROOT / "guest" / "build-kit", d / "guest" / "build-kit")
        for stub, body in (("scripts/setup", f"echo 'setup ran'\nexit {setup_rc}\n"),
                           (".venv/bin/kvmkit", 'echo "kvmkit $*"\nexit 3\n')):
            (d / stub).write_text("#!/bin/sh\n" + body)
            (d / stub).chmod(0o755)
        (d / ".venv" / "bin" / "python").symlink_to(sys.executable)
        env = dict(os.environ, **env_extra)
        cmd = [str(d / "demo")]
        if user:
            cmd = ["setpriv", f"--reuid={user}", "--regid=nogroup", "--clear-groups", "--", *cmd]
        return subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    finally:
        shutil.rmtree(d)


def test_demo_without_a_kvm_device(tmp_path):
    missing = tmp_path / "kvm"
    r = _demo({"KVMKIT_DEV_KVM": str(missing), "KVMKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f"demo: error: {missing} does not exist: load the kvm module (modprobe kvm_intel or kvm_amd) "
        "and enable virtualization in the firmware"]
    assert r.stdout == "", "nothing is set up before the check"
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root (to make a device node) and setpriv (to drop to nobody)")
def test_demo_without_access_to_kvm():
    # A node like /dev/kvm (root:kvm, 0660), checked by an unprivileged user
    # (root passes every permission check).
    try:
        kvm_gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        pytest.skip("no kvm group")
    d = Path(tempfile.mkdtemp())
    try:
        d.chmod(0o755)
        node = d / "kvm"
        try:
            os.mknod(node, 0o660 | stat.S_IFCHR, os.makedev(10, 232))
        except OSError as e:
            pytest.skip(f"cannot make a device node here: {e}")
        os.chown(node, 0, kvm_gid)
        node.chmod(0o660)
        r = _demo({"KVMKIT_DEV_KVM": str(node), "KVMKIT_CACHE": "/nonexistent/cache", "HOME": "/nonexistent"},
                  user="nobody")
        assert r.returncode == 1, r.stdout + r.stderr
        assert r.stderr.splitlines() == [
            f"demo: error: no read/write access to {node}: add yourself to its group "
            "(sudo usermod -aG kvm nobody), then log out and in again"], r.stderr
        assert r.stdout == ""
    finally:
        shutil.rmtree(d)


def test_stale_installs_stop_the_test_run(tmp_path, monkeypatch):
    """The root conftest.py's check: a copy installed from files that changed since."""
    root = tmp_path / "checkout"
    (root / "core").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\nname = "kvmkit"\n')
    (root / "core" / "machine.py").write_text("x = 1\n")
    (root / "plugins" / "rtc").mkdir(parents=True)
    (root / "plugins" / "rtc" / "pyproject.toml").write_text('[project]\nname = "kvmkit-rtc"\n')
    prefix = tmp_path / "venv"
    prefix.mkdir()
    record = prefix / checkout_installs.RECORD
    record.write_text(f". user {checkout_installs.digest('.', 'user', root)}\n")

    class Dist:
        def __init__(self, editable):
            self.editable = editable

        def read_text(self, name):
            return '{"url": "file:///x", "dir_info": {"editable": %s}}' % ("true" if self.editable else "false")

    installed = {"kvmkit": Dist(False), "kvmkit-rtc": Dist(True)}

    monkeypatch.setattr(checkout_installs, "_installed", installed.get)
    assert checkout_installs.stale(root, prefix) == []
    # Documentation and tests are not the installed code.
    (root / "core" / "NOTES.md").write_text("notes\n")
    assert checkout_installs.stale(root, prefix) == []
    (root / "core" / "machine.py").write_text("x = 2\n")
    assert checkout_installs.stale(root, prefix) == [
        "kvmkit: core/ changed since scripts/setup installed it"]
    # Not editable and not installed by scripts/setup: nothing says which files.
    installed["kvmkit-rtc"] = Dist(False)
    assert checkout_installs.stale(root, prefix)[1] == (
        "kvmkit-rtc: installed by hand, not editable, so maybe not plugins/rtc/ as it is now")
    # Editable (--dev): only what is built at install time counts.
    record.write_text(f". dev {checkout_installs.digest('.', 'dev', root)}\n")
    installed["kvmkit-rtc"] = Dist(True)
    (root / "core" / "machine.py").write_text("x = 3\n")
    assert checkout_installs.stale(root, prefix) == []
    (root / "setup.py").write_text("# builds the cffi module\n")
    assert checkout_installs.stale(root, prefix) == [
        "kvmkit: the C sources or build files in core/ changed since scripts/setup installed it"]


def test_demo_says_what_and_how_long_then_how_to_run_again(tmp_path):
    kvm = tmp_path / "kvm"          # a stand-in this user can read and write
    kvm.touch(mode=0o600)
    cache = tmp_path / "cache"
    for k, secs in (("small", 200), ("acpi", 220)):
        (cache / "kernels" / k).mkdir(parents=True)
        (cache / "kernels" / k / "timing").write_text(f"seconds={secs}\nsteps=1391\njobs=2\n")
    demo_toml = '[kernel]\ncmdline = "console=ttyS0 panic=-1"\n'
    (cache / "demo.toml").write_text(demo_toml)
    env = {"KVMKIT_DEV_KVM": str(kvm), "KVMKIT_CACHE": str(cache)}
    r = _demo(env, setup_rc=0)
    assert r.returncode == 3, "the guest's exit status is the demo's"
    lines = r.stdout.splitlines()
    # No terminal on stdin: the guest reports and powers off.
    assert lines[0] == (f"demo: sets up .venv (kvmkit and its plugins) and the guest kit in {cache}, then boots "
                        "a small Linux guest with 2 vCPUs: it prints what it sees and powers off")
    # The kernels' last builds here took 200 s and 220 s (+20 s each to extract).
    assert lines[1] == ("demo: this run builds the guest kernels: about 8 min on this machine "
                        "(as its last builds took), with progress below")
    assert lines[2:] == [
        "setup ran",
        f"kvmkit run {cache}/demo.toml --append console=ttyS0 panic=-1 kvmkit.init=report",
        f"demo: to boot the guest again without set-up: .venv/bin/kvmkit run {cache}/demo.toml "
        '--append "console=ttyS0 panic=-1 kvmkit.init=report"']

    # Built already (stamps of this recipe): set-up only checks.
    recipe = re.search(r"^RECIPE_VERSION=(\d+)", (ROOT / "guest" / "build-kit").read_text(), re.M).group(1)
    for k in ("small", "acpi"):
        (cache / "kernels" / k / "stamp").write_text(f"recipe={recipe} source=[x] fragment=y\n")
    r = _demo(env, setup_rc=0)
    assert r.stdout.splitlines()[1] == "demo: the guest kit is built: set-up only checks (seconds), then the guest boots"

    # Never built here: a rough figure for this many cores.
    shutil.rmtree(cache / "kernels")
    r = _demo(env, setup_rc=0)
    assert re.fullmatch(r"demo: first run: installs packages and builds two guest kernels, roughly \d+ min "
                        r"on \d+ cores \(about 4 min each on 2\), with progress below", r.stdout.splitlines()[1])
