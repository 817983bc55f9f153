"""The contract's checks of a kind's plugin object: ``loads``, ``hooks``,
``spec``, ``keys``, ``readme``; ``device`` and ``state`` run their chapters
(:mod:`.device`, :mod:`.state`)."""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import pluggy

from ..config import ConfigError, DeviceTable, validate_device
from ..plugin_api import DeviceSpec, Key, Size
from ..plugins import DEVICE_GROUP, new_manager
from .base import ContractFailure, KindUnderTest
from .device import FUZZ_ACCESSES, THREAD_GRACE_S, VIRTIO_ROUNDS, DeviceRun, installed_queue_backends
from .state import StateRun

__all__ = ["CHECKS", "KindContract"]

CHECKS = ("loads", "hooks", "spec", "keys", "readme", "device", "state")
SUPPORTED_TYPES = (int, bool, str, float, Path, Size, list)
KEY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


class KindContract:
    """The contract checks for one kind; each ``check_*`` raises ContractFailure."""

    def __init__(self, target: KindUnderTest):
        self.target = target
        self.kind = target.kind
        self._plugin: Any = None
        self._loaded = False

    def __repr__(self) -> str:
        return f"KindContract({self.kind!r} from {self.target.distribution})"

    # -- shared steps (each failure names the step that broke) ------------------------------
    def plugin(self) -> Any:
        if not self._loaded:
            try:
                self._plugin = self.target.entry_point.load()
            except Exception as e:
                raise ContractFailure(f"{self.kind}: entry point {self.target.entry_point.value!r} "
                                      f"does not load: {type(e).__name__}: {e}") from e
            self._loaded = True
        return self._plugin

    def manager(self) -> pluggy.PluginManager:
        """A plugin manager with kvmkit's hook specs and this plugin, checked."""
        plugin = self.plugin()
        pm = new_manager()
        try:
            pm.register(plugin, name=f"{DEVICE_GROUP}:{self.kind}")
        except (pluggy.PluginValidationError, ValueError) as e:
            raise ContractFailure(f"{self.kind}: not a valid kvmkit plugin: {e}") from None
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise ContractFailure(f"{self.kind}: implements a hook kvmkit does not have "
                                  f"(check the name against kvmkit.hookspecs): {e}") from None
        return pm

    def spec(self) -> DeviceSpec:
        pm = self.manager()
        specs = []
        for impl in pm.hook.kvmkit_device_spec.get_hookimpls():
            try:
                result = impl.function()
            except Exception as e:
                raise ContractFailure(f"{self.kind}: kvmkit_device_spec raised "
                                      f"{type(e).__name__}: {e}") from e
            specs.extend(result if isinstance(result, (list, tuple)) else [result])
        bad = [s for s in specs if not isinstance(s, DeviceSpec)]
        if bad:
            raise ContractFailure(f"{self.kind}: kvmkit_device_spec returned {bad[0]!r}; return a "
                                  "kvmkit.plugin_api.DeviceSpec (or a list of them)")
        mine = [s for s in specs if s.kind == self.kind]
        if not mine:
            kinds = ", ".join(repr(s.kind) for s in specs) or "none"
            raise ContractFailure(f"{self.kind}: kvmkit_device_spec declares kinds {kinds} but not "
                                  f"{self.kind!r}, the entry-point name: the two must be equal")
        return mine[0]

    # -- loads, hooks, spec ------------------------------------------------------------------
    def check_loads(self) -> None:
        if self.plugin() is None:
            raise ContractFailure(f"{self.kind}: entry point {self.target.entry_point.value!r} "
                                  "names None")

    def check_hooks(self) -> None:
        pm = self.manager()
        for hook in ("kvmkit_device_spec", "kvmkit_create_device"):
            if not getattr(pm.hook, hook).get_hookimpls():
                raise ContractFailure(f"{self.kind}: implements no {hook} hook; a device plugin "
                                      "needs kvmkit_device_spec and kvmkit_create_device "
                                      "(DevicePlugin(spec, factory) has both)")

    def check_spec(self) -> None:
        spec = self.spec()
        if not isinstance(spec.summary, str) or not spec.summary.strip():
            raise ContractFailure(f"{self.kind}: the DeviceSpec has no summary; give a one-line "
                                  "description (kvmkit plugins shows it)")
        if "\n" in spec.summary.strip():
            raise ContractFailure(f"{self.kind}: the summary is more than one line")
        if not isinstance(spec.keys, tuple) or not all(isinstance(k, Key) for k in spec.keys):
            raise ContractFailure(f"{self.kind}: DeviceSpec.keys must be a tuple of "
                                  "kvmkit.plugin_api.Key")

    # -- keys -----------------------------------------------------------------------------------
    def check_keys(self) -> None:
        spec = self.spec()
        seen: set[str] = set()
        for key in spec.keys:
            where = f"{self.kind}: key {key.name!r}"
            if not isinstance(key.name, str) or not KEY_NAME.match(key.name):
                raise ContractFailure(f"{where}: not a usable TOML key name (letters, digits, "
                                      "'_' and '-', not starting with a digit)")
            if key.name == "kind":
                raise ContractFailure(f"{where}: 'kind' is the machine file's, not a device key")
            if key.name in seen:
                raise ContractFailure(f"{where}: declared twice")
            seen.add(key.name)
            if not any(key.type is t for t in SUPPORTED_TYPES):
                raise ContractFailure(f"{where}: type {key.type!r} is not one the core validates "
                                      "(int, bool, str, float, Path, Size, list)")
            if not isinstance(key.doc, str) or not key.doc.strip():
                raise ContractFailure(f"{where}: no doc string; say what it does and, for an "
                                      "optional key, what its absence means")
            self._check_default(key, where)

    def _check_default(self, key: Key, where: str) -> None:
        if key.choices is not None:
            if not isinstance(key.choices, (tuple, list)) or not key.choices:
                raise ContractFailure(f"{where}: choices must be a non-empty tuple")
            for choice in key.choices:
                if not _has_type(choice, key.type):
                    raise ContractFailure(f"{where}: choice {choice!r} is not a {key.type_name}")
        if key.min is not None and key.max is not None and key.min > key.max:
            raise ContractFailure(f"{where}: min {key.min} is above max {key.max}")
        if key.required or key.default is None:
            return
        default = key.default
        if not _has_type(default, key.type):
            raise ContractFailure(f"{where}: default {default!r} is not a {key.type_name}")
        if key.choices is not None and default not in key.choices:
            raise ContractFailure(f"{where}: default {default!r} is not one of its choices "
                                  f"{tuple(key.choices)!r}")
        value = Size.parse(default) if key.type is Size else default
        if key.min is not None and value < key.min:
            raise ContractFailure(f"{where}: default {default!r} is below its min {key.min}")
        if key.max is not None and value > key.max:
            raise ContractFailure(f"{where}: default {default!r} is above its max {key.max}")

    # -- readme ---------------------------------------------------------------------------------
    def check_readme(self, readme: str | None) -> None:
        """``readme`` is the distribution's README text (None: it ships none)."""
        if readme is None:
            return
        spec = self.spec()
        missing = [name for name in (self.kind, *(k.name for k in spec.keys))
                   if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", readme)]
        if missing:
            raise ContractFailure(f"{self.kind}: the README of {self.target.distribution} does not "
                                  f"mention {', '.join(repr(m) for m in missing)}: document the kind "
                                  "and every key (name, type, default, meaning)")

    # -- the device --------------------------------------------------------------------------
    def check_device(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path, *,
                     allowed_errors: tuple[type[BaseException], ...] = (), seed: int = 0,
                     accesses: int = FUZZ_ACCESSES, virtio_rounds: int = VIRTIO_ROUNDS,
                     thread_grace: float = THREAD_GRACE_S) -> None:
        """Create, start, fuzz and close the device once per example table in
        ``configs`` (relative paths resolve against ``base_dir``); with no
        tables, once with the defaults."""
        pm = self.manager()
        for n, (label, config) in enumerate(self.configs(configs, base_dir)):
            DeviceRun(self, pm, config, label, allowed_errors, random.Random(seed + n),
                       accesses, virtio_rounds, thread_grace).run()

    def check_state(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path, *,
                    seed: int = 0) -> None:
        """The device's state for snapshots (kvmkit.contract.state): once per
        example table (and queue backend), saved mid-operation and restored
        into a fresh instance, it saves the same state again and behaves the
        same."""
        pm = self.manager()
        for n, (label, config) in enumerate(self.configs(configs, base_dir)):
            StateRun(self, pm, config, label, random.Random(seed + n)).run()

    def configs(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path) -> list:
        """(label, validated DeviceConfig) per example table; a virtio kind's
        tables once per installed queue backend; no tables: the defaults."""
        spec = self.spec()
        tables = [dict(c) for c in configs] if configs else []
        if not tables:
            required = [k.name for k in spec.keys if k.required]
            if required:
                raise ContractFailure(
                    f"{self.kind}: key(s) {', '.join(required)} are required, so the contract "
                    "cannot create the device from its defaults: return example tables from the "
                    "pytest hook pytest_kvmkit_contract_configs(kind, tmp_path) in conftest.py")
            tables = [{}]
        if spec.key("queue") is not None:      # a virtio kind: every installed queue backend
            tables = [t if "queue" in t else {**t, "queue": q}
                      for t in tables for q in installed_queue_backends()]
        out = []
        for n, raw in enumerate(tables):
            label = f"{self.kind} with {raw}" if raw else f"{self.kind} with its defaults"
            table = DeviceTable(self.kind, raw, f"contract table {n} ({self.kind})", base_dir)
            try:
                config = validate_device(table, spec)
            except ConfigError as e:
                raise ContractFailure(f"example table {n} does not validate: {e}") from None
            out.append((label, config))
        return out


def _has_type(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if t is int:
        return isinstance(value, int)
    if t is float:
        return isinstance(value, (int, float))
    if t is str:
        return isinstance(value, str)
    if t is Path:
        return isinstance(value, (str, Path))
    if t is Size:
        try:
            Size.parse(value)
        except ValueError:
            return False
        return True
    if t is list:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return False
