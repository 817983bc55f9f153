"""A plugin that fails to import, or that is not a valid kvmkit plugin, is
named in one line: `kvmkit run` and `kvmkit check` exit 2, `kvmkit plugins`
lists it with its error next to the plugins that work."""
import json
import os
import subprocess
import sys

import pytest

from distributions import write_distribution
from fake_kernels import elf_kernel
from kvmkit.cli import main

BROKEN = {"broken_plugin": "import module_that_is_not_installed_anywhere\n"}
MISNAMED = {"misnamed_plugin": """
from kvmkit.plugin_api import DevicePlugin, DeviceSpec
plugin = DevicePlugin(DeviceSpec("something-else", "wrong kind"), lambda config, ctx: None)
"""}


@pytest.fixture
def broken(throwaway_dist):
    return throwaway_dist("kvmkit-broken", {**BROKEN, **MISNAMED},
                          {"broken": "broken_plugin:plugin", "misnamed": "misnamed_plugin:plugin"})


def machine(tmp_path, kind):
    elf_kernel(tmp_path / "vmlinux")         # a kernel check accepts: the plugin is the one problem
    m = tmp_path / "m.toml"                   # a name of its own: no VM of that name runs
    m.write_text(f'[machine]\nname = "broken-plugin-{tmp_path.name}"\n[kernel]\nimage = "vmlinux"\n'
                 f'[[device]]\nkind = "rtc"\n[[device]]\nkind = "{kind}"\n')
    return m


def test_run_exits_2_naming_the_plugin(tmp_path):
    site = write_distribution(tmp_path / "site", "kvmkit-broken", BROKEN, {"broken": "broken_plugin:plugin"})
    r = subprocess.run([sys.executable, "-m", "kvmkit", "run", str(machine(tmp_path, "broken"))],
                       capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
                       env=dict(os.environ, PYTHONPATH=str(site)))
    assert r.returncode == 2
    assert r.stderr.splitlines() == [
        "kvmkit: error: device plugin 'broken' (broken_plugin:plugin) failed to load: "
        "ModuleNotFoundError: No module named 'module_that_is_not_installed_anywhere'"]


def test_check_exits_2_naming_the_plugin(broken, tmp_path, capsys):
    assert main(["check", str(machine(tmp_path, "broken"))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmkit: error: device plugin 'broken' (broken_plugin:plugin) failed to load")
    assert len(err.splitlines()) == 1


def test_check_names_a_plugin_whose_spec_has_another_kind(broken, tmp_path, capsys):
    assert main(["check", str(machine(tmp_path, "misnamed"))]) == 2
    assert "device plugin 'misnamed' (misnamed_plugin:plugin) does not declare a DeviceSpec of " \
           "kind 'misnamed'" in capsys.readouterr().err


def test_plugins_lists_broken_ones_with_their_error(broken, capsys):
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "broken  (kvmkit-broken 1.0)  BROKEN\n    device plugin 'broken' (broken_plugin:plugin) " \
           "failed to load: ModuleNotFoundError" in out
    assert "misnamed  (kvmkit-broken 1.0)  BROKEN" in out
    assert "rtc  (kvmkit-rtc " in out                         # the others are still listed
    assert err.startswith("kvmkit: warning: ") and "failed to load: broken, misnamed" in err


def test_plugins_json_carries_the_error(broken, capsys):
    assert main(["plugins", "--json", "broken", "rtc"]) == 0
    entries = {e["kind"]: e for e in json.loads(capsys.readouterr().out)}
    assert "ModuleNotFoundError" in entries["broken"]["error"] and "keys" not in entries["broken"]
    assert "error" not in entries["rtc"] and entries["rtc"]["keys"]
