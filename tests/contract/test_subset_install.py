"""Each plugin installs on its own against the installed core, and the core
runs with any subset: fresh virtual environments holding the core alone, and
the core with one plugin (rtc-fixed, which brings kvmkit-rtc, its dependency),
installed from wheels built from this checkout."""
import subprocess
import sys
from pathlib import Path

import pytest

from fake_kernels import elf_kernel

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]


def _run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{cmd}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    """Wheels of the core, rtc and rtc-fixed and their dependencies."""
    out = tmp_path_factory.mktemp("wheels")
    _run(PIP + ["wheel", "-w", str(out), str(ROOT), str(ROOT / "plugins/rtc"),
                str(ROOT / "plugins/rtc_fixed")])
    return out


def venv(where: Path, wheels: Path, *packages: str) -> Path:
    """A fresh venv (no pip, no site-packages of ours) with ``packages`` from ``wheels``."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(where)])
    python = where / "bin" / "python"
    _run(PIP + ["--python", str(python), "install", "--no-index", "--find-links", str(wheels),
                *packages])
    return where / "bin" / "kvmkit"


def machine(tmp_path, *kinds):
    elf_kernel(tmp_path / "vmlinux")
    m = tmp_path / f"{'-'.join(kinds) or 'bare'}.toml"
    m.write_text('[kernel]\nimage = "vmlinux"\n' + "".join(f'[[device]]\nkind = "{k}"\n' for k in kinds))
    return m


def kvmkit(exe, *args):
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def test_core_alone(wheels, tmp_path):
    exe = venv(tmp_path / "core", wheels, "kvmkit")
    r = kvmkit(exe, "plugins")
    assert (r.returncode, r.stdout) == (0, "no device plugins are installed (pip install one, "
                                           "e.g. ./plugins/rtc)\n"), r.stderr
    assert kvmkit(exe, "plugins", "--json").stdout.strip() == "[]"
    r = kvmkit(exe, "check", str(machine(tmp_path)))
    assert r.returncode == 0 and r.stdout.endswith("devices: none\n"), r.stderr
    r = kvmkit(exe, "check", str(machine(tmp_path, "rtc")))
    assert r.returncode == 2
    assert r.stderr == (f"kvmkit: error: {tmp_path / 'rtc.toml'}: device[0] (rtc): "
                        "unknown device kind 'rtc': no plugin installed provides it "
                        "(installed kinds: none); pip install the plugin that does\n")


def test_core_with_one_plugin_and_its_dependency(wheels, tmp_path):
    exe = venv(tmp_path / "fixed", wheels, "kvmkit-rtc-fixed")
    r = kvmkit(exe, "plugins")
    assert r.returncode == 0, r.stderr
    listed = [line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()]
    assert listed == ["rtc", "rtc-fixed"]
    assert "rtc-fixed  (kvmkit-rtc-fixed 0.1.0)" in r.stdout
    r = kvmkit(exe, "check", str(machine(tmp_path, "rtc-fixed")))
    assert r.returncode == 0 and r.stdout.endswith("devices: rtc-fixed\n"), r.stderr
    r = kvmkit(exe, "check", str(machine(tmp_path, "rtc-fixed", "serial8250")))
    assert r.returncode == 2
    assert "unknown device kind 'serial8250'" in r.stderr and "installed kinds: rtc, rtc-fixed" in r.stderr
