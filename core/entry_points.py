"""Entry points of the installed distributions, read from their metadata files.

``importlib.metadata`` answers the same question but costs more to import
than the rest of a ``kvmkit run`` start-up does (it pulls in ``email``,
``csv``, ``zipfile`` and dozens of regular expressions: about 35 ms of CPU on
the development VM).  kvmkit needs only the ``entry_points.txt`` of each
``*.dist-info`` / ``*.egg-info`` folder on ``sys.path``, and, for ``kvmkit
plugins``, a distribution's name and version from its ``METADATA``: this
module reads those and nothing else.  Like ``importlib.metadata``, the first
distribution of a name along ``sys.path`` wins.  Nothing is imported until
:meth:`EntryPoint.load`.
"""
from __future__ import annotations

import os
import sys

__all__ = ["Distribution", "EntryPoint", "group", "forget"]


def _normalize(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


class Distribution:
    """An installed distribution's metadata folder; name and version read on demand."""

    __slots__ = ("path", "_headers")

    def __init__(self, path: str):
        self.path = path
        self._headers: dict[str, str] | None = None

    def _header(self, key: str) -> str | None:
        if self._headers is None:
            headers: dict[str, str] = {}
            for meta in ("METADATA", "PKG-INFO"):
                try:
                    with open(os.path.join(self.path, meta), encoding="utf-8") as f:
                        for line in f:
                            if not line.strip():
                                break              # the headers end at the first blank line
                            k, sep, v = line.partition(":")
                            if sep and not k[:1].isspace():
                                headers.setdefault(k.strip().lower(), v.strip())
                    break
                except OSError:
                    continue
            self._headers = headers
        return self._headers.get(key)

    @property
    def name(self) -> str:
        return self._header("name") or os.path.basename(self.path).split("-", 1)[0]

    @property
    def version(self) -> str | None:
        return self._header("version")

    def __repr__(self) -> str:
        return f"Distribution({self.path!r})"


class EntryPoint:
    """``name = module:attr`` in ``group`` of ``dist``."""

    __slots__ = ("name", "value", "group", "dist")

    def __init__(self, name: str, value: str, group: str, dist: Distribution | None):
        self.name, self.value, self.group, self.dist = name, value, group, dist

    @property
    def module(self) -> str:
        return self.value.split("[", 1)[0].partition(":")[0].strip()

    @property
    def attr(self) -> str:
        return self.value.split("[", 1)[0].partition(":")[2].strip()

    def load(self):
        """Import the module and return the named object (the module itself
        when the value names no attribute)."""
        import importlib
        obj = importlib.import_module(self.module)
        for part in filter(None, self.attr.split(".")):
            obj = getattr(obj, part)
        return obj

    def __repr__(self) -> str:
        return f"EntryPoint(name={self.name!r}, value={self.value!r}, group={self.group!r})"


def _parse(text: str, dist: Distribution, out: dict[str, list[EntryPoint]]) -> None:
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line[0] == "[" and line[-1] == "]":
            section = line[1:-1].strip()
            continue
        name, sep, value = line.partition("=")
        if section is None or not sep:
            continue
        out.setdefault(section, []).append(EntryPoint(name.strip(), value.strip(), section, dist))


def _scan(path: tuple[str, ...]) -> dict[str, list[EntryPoint]]:
    groups: dict[str, list[EntryPoint]] = {}
    seen: set[str] = set()
    for entry in path:
        folder = entry or "."
        try:
            names = sorted(os.listdir(folder))
        except OSError:                   # not a folder (a zip file), or gone
            continue
        for name in names:
            if not name.endswith((".dist-info", ".egg-info")):
                continue
            dist_name = _normalize(name.rsplit(".", 1)[0].split("-", 1)[0])
            if dist_name in seen:
                continue
            where = os.path.join(folder, name)
            try:
                with open(os.path.join(where, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:               # no entry points (or an egg-info file, not a folder)
                if os.path.isdir(where):
                    seen.add(dist_name)
                continue
            seen.add(dist_name)
            _parse(text, Distribution(where), groups)
    return groups


_cache: dict[tuple[str, ...], dict[str, list[EntryPoint]]] = {}


def group(name: str) -> list[EntryPoint]:
    """Every entry point in group ``name``, in ``sys.path`` order.  The scan
    is kept per ``sys.path``, so a folder added to the path is seen."""
    key = tuple(sys.path)
    if key not in _cache:
        _cache.clear()
        _cache[key] = _scan(key)
    return list(_cache[key].get(name, ()))


def forget() -> None:
    """Drop the kept scan (a distribution was installed into a folder
    already on the path)."""
    _cache.clear()
