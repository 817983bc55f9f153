"""The distributions of this checkout, and whether .venv holds their current code.

scripts/setup installs kvmkit and its plugins into .venv, normally (a copy)
or with --dev editable (the checkout itself), and records for each the digest
of its source files at install time in ``.venv/kvmkit-installed``:

    DIR MODE DIGEST        e.g. "plugins/rtc user 3f1c..."

It runs this module to get the digests (``python3 scripts/checkout_installs.py
digest MODE DIR...``) and reinstalls a distribution only when its line
changed.  The test run (the repository's conftest.py) calls ``stale()`` so that
``pytest`` never tests an installed copy older than the checkout.

A "user" digest covers every source file but the tests and documentation; a "dev" (editable)
digest only what is built at install time (C sources, build scripts,
metadata), since editable installs see Python changes without reinstalling.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECORD = "kvmkit-installed"
# The root distribution's files (the rest of the root belongs to others).
ROOT_DIST_PATHS = ("core", "pyproject.toml", "setup.py")
SKIP_PARTS = {"tests", "fuzz", "__pycache__", "build", ".pytest_cache"}
SKIP_SUFFIXES = (".so", ".o", ".pyc", ".md")  # documentation is not code


def distributions(root: Path = ROOT) -> list[str]:
    """Each distribution's directory, relative to root: "." first (the others need it)."""
    dirs = ["."]
    for pattern in ("plugins/*", "native", "examples/*"):
        dirs += sorted(str(p.relative_to(root)) for p in root.glob(pattern) if (p / "pyproject.toml").is_file())
    return dirs


def _source_files(root: Path, dist: str) -> list[str]:
    paths = ROOT_DIST_PATHS if dist == "." else (dist,)
    try:
        out = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "-co", "--exclude-standard", "--", *paths],
                             capture_output=True, check=True).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.CalledProcessError):   # not a git checkout: walk the tree
        files = [str(p.relative_to(root)) for base in paths for p in sorted((root / base).rglob("*"))
                 if p.is_file()] + [b for b in paths if (root / b).is_file()]
    return sorted({f for f in files
                   if not SKIP_PARTS.intersection(Path(f).parts) and not f.endswith(SKIP_SUFFIXES)
                   and ".egg-info" not in f and (root / f).is_file()})


def _built_at_install(name: str) -> bool:
    return not name.endswith(".py") or name.endswith(("_build.py", "setup.py"))


def digest(dist: str, mode: str, root: Path = ROOT) -> str:
    h = hashlib.sha256()
    for f in _source_files(root, dist):
        if mode == "dev" and not _built_at_install(f):
            continue
        h.update(f.encode() + b"\0" + (root / f).read_bytes() + b"\0")
    return h.hexdigest()[:32]


def _project_name(root: Path, dist: str) -> str:
    import tomllib
    return tomllib.loads((root / dist / "pyproject.toml").read_text())["project"]["name"]


def _installed(name: str):
    """The distribution installed in this environment's site-packages (not an
    egg-info that a build left in the checkout, which sys.path may also hold)."""
    paths = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    return next(iter(metadata.distributions(name=name, path=paths)), None)


def stale(root: Path = ROOT, prefix: Path = Path(sys.prefix)) -> list[str]:
    """One line per distribution of this checkout whose installed code may not be
    the checkout's: installed by scripts/setup from files that changed since, or
    installed (not editable) by hand, so nothing says which files it came from."""
    recorded = {}
    record = prefix / RECORD
    if record.is_file():
        for line in record.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                recorded[parts[0]] = (parts[1], parts[2])
    problems = []
    for dist in distributions(root):
        name = _project_name(root, dist)
        installed = _installed(name)
        if installed is None:
            continue
        direct = json.loads(installed.read_text("direct_url.json") or "{}")
        editable = bool(direct.get("dir_info", {}).get("editable"))
        where = "core/" if dist == "." else dist + "/"
        if dist in recorded:
            mode, want = recorded[dist]
            if digest(dist, mode, root) != want:
                what = f"the C sources or build files in {where}" if mode == "dev" else where
                problems.append(f"{name}: {what} changed since scripts/setup installed it")
        elif not editable:
            problems.append(f"{name}: installed by hand, not editable, so maybe not {where} as it is now")
    return problems


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "digest" and argv[1] in ("user", "dev"):
        for dist in argv[2:]:
            print(dist, argv[1], digest(dist, argv[1]))
        return 0
    if argv == ["list"]:
        print("\n".join(distributions()))
        return 0
    print("usage: checkout_installs.py digest user|dev DIR... | list", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
