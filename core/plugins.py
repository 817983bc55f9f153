"""Finding device plugins (stevedore entry points) and registering them (pluggy).

Only the kinds a machine file names are imported.  A missing kind is an
error that lists what is installed; a plugin that fails to import, or whose
spec does not match its entry-point name, is an error naming the plugin.
"""
from __future__ import annotations

import importlib.metadata
from typing import NamedTuple

import pluggy
from stevedore import NamedExtensionManager

from . import hookspecs
from .plugin_api import DeviceSpec, PROJECT

DEVICE_GROUP = "kvmkit.devices"


class PluginError(Exception):
    """A device plugin is missing or broken."""


class LoadedKind(NamedTuple):
    spec: DeviceSpec
    plugin: object                  # the registered plugin object (usually a module)
    distribution: str


def installed_kinds() -> dict[str, importlib.metadata.EntryPoint]:
    """Device kinds installed in this environment, without importing them."""
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=DEVICE_GROUP)}


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
    failures: list[str] = []

    def on_failure(_manager, entrypoint, error):
        failures.append(f"device plugin {entrypoint.name!r} ({entrypoint.value}) failed to "
                        f"load: {type(error).__name__}: {error}")

    manager = NamedExtensionManager(DEVICE_GROUP, names=wanted, invoke_on_load=False,
                                    on_load_failure_callback=on_failure, name_order=True)
    if failures:
        raise PluginError(failures[0])
    loaded: dict[str, LoadedKind] = {}
    for ext in manager.extensions:
        plugin = ext.plugin
        if pm.is_registered(plugin):
            registered = plugin
        else:
            try:
                pm.register(plugin, name=f"{DEVICE_GROUP}:{ext.name}")
            except (pluggy.PluginValidationError, ValueError) as e:
                raise PluginError(f"device plugin {ext.name!r} is not a valid kvmkit plugin: {e}") from None
            registered = plugin
        specs = {s.kind: s for s in _specs_of(pm, registered) if isinstance(s, DeviceSpec)}
        if ext.name not in specs:
            raise PluginError(f"device plugin {ext.name!r} ({ext.entry_point.value}) does not "
                              f"declare a DeviceSpec of kind {ext.name!r} in kvmkit_device_spec")
        ep = available[ext.name]
        dist = ep.dist.name if ep.dist is not None else "?"
        loaded[ext.name] = LoadedKind(specs[ext.name], registered, dist)
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        raise PluginError(f"a device plugin implements a hook kvmkit does not have: {e}") from None
    return loaded


def check_devices(pm: pluggy.PluginManager, devices, machine) -> list[str]:
    """Every problem the plugins' ``kvmkit_check_device`` find, one line each,
    prefixed with the device's place in the machine file."""
    problems: list[str] = []
    for config in devices:
        try:
            results = pm.hook.kvmkit_check_device(kind=config.kind, config=config,
                                                  devices=tuple(devices), machine=machine)
        except Exception as e:                  # a plugin bug: name the device, keep going
            problems.append(f"{config.where}: the {config.kind!r} plugin's check failed: "
                            f"{type(e).__name__}: {e}")
            continue
        for result in results:
            for message in ([result] if isinstance(result, str) else result or ()):
                for line in str(message).splitlines() or [""]:
                    problems.append(f"{config.where}: {line}")
    return problems
