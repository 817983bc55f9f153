"""What the contract runs against (a distribution's kinds, its README) and
how it fails."""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import re
import tomllib
import urllib.parse
from pathlib import Path

from ..plugins import DEVICE_GROUP

__all__ = ["ContractFailure", "ContractSetupError", "KindUnderTest", "project_distribution",
           "kinds_of", "distribution_readme"]


class ContractFailure(AssertionError):
    """A plugin breaks the contract; the message says how to fix it."""


class ContractSetupError(Exception):
    """The contract cannot run (no such distribution, no kinds in it)."""


@dataclasses.dataclass(frozen=True)
class KindUnderTest:
    kind: str
    entry_point: importlib.metadata.EntryPoint
    distribution: str


# -- what is under test ----------------------------------------------------------------------
def project_distribution(start: Path) -> tuple[str, Path] | None:
    """``(name, pyproject path)`` of the nearest pyproject.toml at or above
    ``start`` that has a ``[project] name``."""
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            try:
                name = tomllib.loads(candidate.read_text()).get("project", {}).get("name")
            except (OSError, tomllib.TOMLDecodeError):
                name = None
            if isinstance(name, str) and name:
                return name, candidate
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kinds_of(distribution: str) -> list[KindUnderTest]:
    """The device kinds an installed distribution provides."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ContractSetupError(f"distribution {distribution!r} is not installed: install it "
                                 "first (pip install -e .)") from None
    name = dist.metadata["Name"] or distribution
    eps = [ep for ep in dist.entry_points if ep.group == DEVICE_GROUP]
    if not eps:
        raise ContractSetupError(f"distribution {name!r} declares no entry points in "
                                 f"{DEVICE_GROUP!r}: add [project.entry-points.\"{DEVICE_GROUP}\"] "
                                 "to its pyproject.toml and reinstall it")
    return [KindUnderTest(ep.name, ep, name) for ep in sorted(eps, key=lambda e: e.name)]


def distribution_readme(distribution: str) -> str | None:
    """The README a distribution ships (its long description), if any.  For
    an editable install, the project's README file as it is now (the
    installed copy is only refreshed by reinstalling)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    source = _editable_readme(dist)
    if source is not None:
        return source
    meta = dist.metadata
    text = meta.get_payload() or meta.get("Description") or ""
    return text if text.strip() else None


def _editable_readme(dist) -> str | None:
    """The README file of the project an editable (or in-tree egg-info)
    distribution comes from."""
    candidates = []
    try:
        origin = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        origin = {}
    url = origin.get("url", "")
    if origin.get("dir_info", {}).get("editable") and url.startswith("file://"):
        candidates.append(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)))
    candidates.append(Path(str(dist.locate_file(""))))        # an in-tree *.egg-info's folder
    for project in candidates:
        try:
            meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        except (OSError, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        if _normalise(str(meta.get("name", ""))) != _normalise(dist.metadata["Name"] or ""):
            continue
        readme = meta.get("readme")
        if isinstance(readme, dict):
            readme = readme.get("file")
        try:
            return (project / readme).read_text() if isinstance(readme, str) else None
        except (OSError, UnicodeDecodeError):
            return None
    return None


def random_access(rng, space: str, base: int, size: int, widths, what_range: str = ""):
    """One random register access to a range of ``size`` bytes at ``base``:
    (width, offset, is_write, value, what), ``what`` saying it in words."""
    width = rng.choice([w for w in widths if w <= size] or [size])
    offset = rng.randrange(0, size - width + 1)
    is_write = rng.random() < 0.5
    value = rng.getrandbits(8 * width)
    what = (f"{'write of ' + hex(value) + ' to' if is_write else 'read of'} {what_range}"
            f"{space} {base + offset:#x} (size {width})")
    return width, offset, is_write, value, what
