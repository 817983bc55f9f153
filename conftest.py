"""The test run tests this checkout's code.

scripts/setup installs kvmkit and its plugins into .venv as copies (or, with
--dev, editable).  A copy older than the checkout would make pytest test the
old code, so the run stops first and says how to bring .venv up to date.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import checkout_installs  # noqa: E402

sys.path.pop(0)


def pytest_configure(config):
    problems = checkout_installs.stale()
    if problems:
        raise pytest.UsageError(
            "the code in .venv is not this checkout's: " + "; ".join(problems)
            + ". Run scripts/setup (or scripts/setup --dev for editable installs) and test again")
