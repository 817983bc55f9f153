"""Finding device plugins (entry points) and registering them (pluggy).

Only the kinds a machine file names are imported.  A missing kind is an
error that lists what is installed; a plugin that fails to import, or whose
spec does not match its entry-point name, is an error naming the plugin.
"""
from __future__ import annotations

from typing import NamedTuple

import pluggy

from . import entry_points, hookspecs
from .plugin_api import DeviceSpec, PROJECT

DEVICE_GROUP = "kvmkit.devices"


class PluginError(Exception):
    """A device plugin is missing or broken."""


class LoadedKind(NamedTuple):
    spec: DeviceSpec
    plugin: object                  # the registered plugin object (usually a module)
    distribution: str


def installed_kinds() -> dict[str, entry_points.EntryPoint]:
    """Device kinds installed in this environment, without importing them."""
    return {ep.name: ep for ep in entry_points.group(DEVICE_GROUP)}


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _specs_of(pm: pluggy.PluginManager, plugin) -> list[DeviceSpec]:
    specs = []
    for impl in pm.hook.kvmkit_device_spec.get_hookimpls():
        if impl.plugin is plugin:
            result = impl.function()
            specs.extend(result if isinstance(result, (list, tuple)) else [result])
    return specs


def load_kinds(pm: pluggy.PluginManager, kinds: list[str]) -> dict[str, LoadedKind]:
    """Import and register the plugins for ``kinds``; return kind -> LoadedKind."""
    wanted = sorted(set(kinds))
    available = installed_kinds()
    missing = [k for k in wanted if k not in available]
    if missing:
        have = ", ".join(sorted(available)) or "none"
        raise PluginError(f"unknown device kind {missing[0]!r}: no plugin installed provides it "
                          f"(installed kinds: {have}); pip install the plugin that does")
    if not wanted:
        return {}
    loaded: dict[str, LoadedKind] = {}
    for name in wanted:
        ep = available[name]
        try:
            plugin = ep.load()
        except Exception as error:
            raise PluginError(f"device plugin {name!r} ({ep.value}) failed to load: "
                              f"{type(error).__name__}: {error}") from error
        if not pm.is_registered(plugin):
            try:
                pm.register(plugin, name=f"{DEVICE_GROUP}:{name}")
            except (pluggy.PluginValidationError, ValueError) as e:
                raise PluginError(f"device plugin {name!r} is not a valid kvmkit plugin: {e}") from None
        specs = {s.kind: s for s in _specs_of(pm, plugin) if isinstance(s, DeviceSpec)}
        if name not in specs:
            raise PluginError(f"device plugin {name!r} ({ep.value}) does not "
                              f"declare a DeviceSpec of kind {name!r} in kvmkit_device_spec")
        dist = ep.dist.name if ep.dist is not None else "?"
        loaded[name] = LoadedKind(specs[name], plugin, dist)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"a device plugin implements a hook kvmkit does not have: {e}") from None
    return loaded
