"""Every installed kvmkit.devices plugin loads, registers against kvmkit's hook
specs (pm.check_pending()) and declares the spec its entry point names."""
import pluggy
import pytest

from kvmkit import catalog
from kvmkit.plugins import installed_kinds, load_kinds, new_manager

KINDS = sorted(installed_kinds())


def test_some_plugins_are_installed():
    assert {"rtc", "serial8250", "i8042"} <= set(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_installed_plugin_loads_and_passes_check_pending(kind):
    pm = new_manager()
    loaded = load_kinds(pm, [kind])[kind]                 # load_kinds runs check_pending too
    pm.check_pending()
    assert loaded.spec.kind == kind
    assert pm.is_registered(loaded.plugin)
    for impl in pm.hook.kvmkit_create_device.get_hookimpls():
        assert impl.plugin is loaded.plugin


def test_all_installed_plugins_together_pass_check_pending():
    pm = new_manager()
    load_kinds(pm, KINDS)
    pm.check_pending()
    specs = [s for result in pm.hook.kvmkit_device_spec()
             for s in (result if isinstance(result, (list, tuple)) else [result])]
    assert {s.kind for s in specs} >= set(KINDS)


def test_the_catalog_loads_every_installed_kind():
    entries = catalog.load_installed()
    assert [e.kind for e in entries] == KINDS
    assert [e.kind for e in entries if not e.ok] == []


def test_check_pending_catches_what_a_plugin_gets_wrong():
    class Typo:
        from kvmkit.plugin_api import hookimpl

        @hookimpl
        def kvmkit_vm_stoped(self, vm):
            pass

    pm = new_manager()
    pm.register(Typo())
    with pytest.raises(pluggy.PluginValidationError):
        pm.check_pending()
