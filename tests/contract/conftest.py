import sys
from pathlib import Path

import pytest
from stevedore import ExtensionManager

sys.path.insert(0, str(Path(__file__).parent))
from distributions import write_distribution  # noqa: E402


@pytest.fixture
def throwaway_dist(tmp_path, monkeypatch):
    """throwaway_dist(name, modules, entry_points, description="") -> its folder,
    on sys.path for this test (entry-point caches cleared before and after)."""
    added: list[str] = []

    def make(name, modules, entry_points, description=""):
        where = write_distribution(tmp_path / name, name, modules, entry_points,
                                   description=description)
        monkeypatch.syspath_prepend(str(where))
        for module in modules:
            sys.modules.pop(module, None)
            added.append(module)
        ExtensionManager.ENTRY_POINT_CACHE.clear()
        return where

    yield make
    for module in added:
        sys.modules.pop(module, None)
    ExtensionManager.ENTRY_POINT_CACHE.clear()
