"""Plugin discovery: entry points in kvmkit.devices, loaded only when named."""
import sys
import textwrap

import pytest
from stevedore import ExtensionManager

from kvmkit.plugins import PluginError, load_kinds, new_manager


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """Install (on sys.path) a distribution with the given plugin modules."""
    def make(modules: dict[str, str], entry_points: dict[str, str]):
        for name, source in modules.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        info = tmp_path / "kvmkit_fake-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kvmkit-fake\nVersion: 1.0\n")
        eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
        (info / "entry_points.txt").write_text(f"[kvmkit.devices]\n{eps}\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        for name in modules:
            sys.modules.pop(name, None)
        ExtensionManager.ENTRY_POINT_CACHE.clear()      # stevedore caches per process
    yield make
    ExtensionManager.ENTRY_POINT_CACHE.clear()


GOOD = """
from kvmkit.plugin_api import hookimpl, DeviceSpec, Key
SPEC = DeviceSpec("fake-dev", "a fake", (Key("port", int, 1),))

@hookimpl
def kvmkit_device_spec():
    return SPEC

@hookimpl
def kvmkit_create_device(kind, config, ctx):
    return object() if kind == "fake-dev" else None
"""


def test_a_named_kind_is_loaded_and_registered(fake_dist):
    fake_dist({"fake_good": GOOD}, {"fake-dev": "fake_good"})
    pm = new_manager()
    loaded = load_kinds(pm, ["fake-dev"])
    assert loaded["fake-dev"].spec.kind == "fake-dev"
    assert loaded["fake-dev"].distribution == "kvmkit-fake"
    assert pm.hook.kvmkit_create_device(kind="fake-dev", config={}, ctx=None) is not None


def test_unnamed_kinds_are_not_imported(fake_dist):
    fake_dist({"fake_good": GOOD, "fake_other": "raise SystemExit('imported!')"},
              {"fake-dev": "fake_good", "other": "fake_other"})
    load_kinds(new_manager(), ["fake-dev"])
    assert "fake_other" not in sys.modules


def test_unknown_kind_lists_what_is_installed(fake_dist):
    fake_dist({"fake_good": GOOD}, {"fake-dev": "fake_good"})
    with pytest.raises(PluginError, match=r"unknown device kind 'nope'.*installed kinds: .*fake-dev"):
        load_kinds(new_manager(), ["nope"])


def test_a_plugin_that_fails_to_import_is_named(fake_dist):
    fake_dist({"fake_broken": "import does_not_exist_anywhere"}, {"broken": "fake_broken"})
    with pytest.raises(PluginError, match=r"device plugin 'broken' \(fake_broken\) failed to load: "
                                          r"ModuleNotFoundError"):
        load_kinds(new_manager(), ["broken"])


def test_spec_must_match_the_entry_point_name(fake_dist):
    fake_dist({"fake_good": GOOD}, {"misnamed": "fake_good"})
    with pytest.raises(PluginError, match="does not declare a DeviceSpec of kind 'misnamed'"):
        load_kinds(new_manager(), ["misnamed"])


def test_misspelled_hook_is_caught(fake_dist):
    fake_dist({"fake_typo": GOOD + "\n@hookimpl\ndef kvmkit_create_devic(kind):\n    pass\n"},
              {"fake-dev": "fake_typo"})
    with pytest.raises(PluginError, match="hook kvmkit does not have"):
        load_kinds(new_manager(), ["fake-dev"])
