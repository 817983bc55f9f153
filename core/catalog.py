"""What device plugins are installed: each kind with its distribution, its
spec (summary and typed keys), or the error that keeps it from loading.

Everything here comes from entry points in ``kvmkit.devices`` and from each
plugin's :class:`~kvmkit.plugin_api.DeviceSpec`; the core knows no kind by
name.  ``kvmkit plugins``, the contract tests and the docs all read it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .plugin_api import DeviceSpec, Key, Size
from .plugins import PluginError, installed_kinds, load_kinds, new_manager


@dataclasses.dataclass(frozen=True)
class InstalledKind:
    """One entry point of ``kvmkit.devices`` after trying to load it."""

    kind: str
    target: str                      # the entry point's value, "module:object"
    distribution: str | None
    version: str | None
    spec: DeviceSpec | None = None   # None when the plugin failed to load
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def load_installed(kinds: list[str] | None = None) -> list[InstalledKind]:
    """Load every installed kind (or only ``kinds``), each in its own plugin
    manager so that one broken plugin cannot hide the others.  A kind that
    fails to load is returned with its error; only a name in ``kinds`` that
    no plugin provides raises :class:`~kvmkit.plugins.PluginError`."""
    available = installed_kinds()
    names = sorted(available) if kinds is None else list(kinds)
    unknown = [k for k in names if k not in available]
    if unknown:                     # raises the core's "unknown device kind" error
        load_kinds(new_manager(), unknown)
    out = []
    for kind in names:
        ep = available[kind]
        dist = ep.dist.name if ep.dist is not None else None
        version = ep.dist.version if ep.dist is not None else None
        try:
            loaded = load_kinds(new_manager(), [kind])[kind]
        except PluginError as e:
            out.append(InstalledKind(kind, ep.value, dist, version, error=str(e)))
        else:
            out.append(InstalledKind(kind, ep.value, dist, version, spec=loaded.spec))
    return out


def toml_value(value: Any) -> Any:
    """A key's default as the machine file would write it (JSON-friendly)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Size):
        return int(value)
    if isinstance(value, tuple):
        return [toml_value(v) for v in value]
    return value


def describe_key(key: Key) -> dict[str, Any]:
    """A key as plain data: name, type, required/optional/default, choices,
    limits and its doc string."""
    out: dict[str, Any] = {"name": key.name, "type": key.type_name, "required": key.required}
    if not key.required:
        out["default"] = toml_value(key.default)
    if key.choices is not None:
        out["choices"] = [toml_value(c) for c in key.choices]
    if key.min is not None:
        out["min"] = key.min
    if key.max is not None:
        out["max"] = key.max
    out["doc"] = key.doc
    return out


def describe(entry: InstalledKind) -> dict[str, Any]:
    """An installed kind as plain data (what ``kvmkit plugins --json`` prints)."""
    out: dict[str, Any] = {"kind": entry.kind, "distribution": entry.distribution,
                           "version": entry.version, "entry_point": entry.target}
    if entry.spec is None:
        out["error"] = entry.error
    else:
        out["summary"] = entry.spec.summary
        out["keys"] = [describe_key(k) for k in entry.spec.keys]
    return out


def format_default(key: Key) -> str:
    """"required", "optional" or "default X", X written as in TOML."""
    if key.required:
        return "required"
    if key.default is None:
        return "optional"
    value = toml_value(key.default)
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, int) and abs(value) > 9:
        text = f"{value} ({value:#x})"
    elif isinstance(value, str):
        text = f'"{value}"'
    else:
        text = repr(value)
    return f"default {text}"


def format_key(key: Key) -> str:
    """One line: ``name (type, default ..., one of ..., min..max): doc``."""
    parts = [key.type_name, format_default(key)]
    if key.choices:
        parts.append("one of " + " | ".join(str(toml_value(c)) for c in key.choices))
    if key.min is not None or key.max is not None:
        low = "" if key.min is None else str(key.min)
        high = "" if key.max is None else str(key.max)
        parts.append(f"range {low}..{high}")
    return f"{key.name} ({', '.join(parts)}): {key.doc or '(undocumented)'}"


def markdown_table(spec: DeviceSpec) -> str:
    """The kind's keys as the Markdown table plugin READMEs carry."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key in spec.keys:
        default = format_default(key).removeprefix("default ")
        if not key.required and key.default is not None:
            value, _, rest = default.partition(" (")
            default = f"`{value}`" + (f" ({rest}" if rest else "")
        choices = f" (one of {', '.join(f'`{toml_value(c)}`' for c in key.choices)})" if key.choices else ""
        doc = key.doc.replace("|", "\\|")
        rows.append(f"| `{key.name}` | {key.type_name} | {default} | {doc}{choices} |")
    return "\n".join(rows)
