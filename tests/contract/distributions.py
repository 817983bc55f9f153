"""Throwaway distributions for tests: plugin modules plus a .dist-info in a folder."""
import textwrap
from pathlib import Path


def write_distribution(where: Path, name: str, modules: dict[str, str],
                       entry_points: dict[str, str], version: str = "1.0",
                       description: str = "") -> Path:
    """A distribution 'installed' in ``where`` (its modules and a .dist-info):
    put ``where`` on sys.path or PYTHONPATH and entry points see it."""
    where.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (where / f"{module}.py").write_text(textwrap.dedent(source))
    info = where / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n"
                                   f"{description}")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvmkit.devices]\n{eps}\n")
    return where
