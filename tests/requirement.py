"""What a test needs from the machine (KVM, the guest kit, kvmkit-native, a
plugin, a host tool).  Missing, it is a skip, except under
``KVMKIT_REQUIRE_KVM=1`` (CI), where it is a failure: a CI run must not pass
by skipping what it was meant to test."""
from __future__ import annotations

import importlib
import os

import pytest

REQUIRE = os.environ.get("KVMKIT_REQUIRE_KVM") == "1"


def need(condition: bool, why: str) -> None:
    if condition:
        return
    if REQUIRE:
        pytest.fail(f"{why} (KVMKIT_REQUIRE_KVM=1 makes this a failure)")
    pytest.skip(why)


def need_module(name: str, what: str | None = None):
    """Import ``name`` (e.g. "kvmkit_native"), or skip/fail saying what to install."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        need(False, f"{what or name} is not installed or does not import ({e})")
