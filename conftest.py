"""The test run tests this checkout's code.

scripts/setup installs kvmkit and its plugins into .venv as copies (or, with
--dev, editable).  A copy older than the checkout would make pytest test the
old code, so the run stops first and says how to bring .venv up to date.
"""

import os
import shutil
import sys
import tempfile
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
    # The VMs a test run starts have their control sockets in a runtime
    # directory of their own: one per pytest process (each pytest-xdist worker
    # has its own), so that machine names never meet a VM of the user's or of
    # another worker.
    config._kvmkit_runtime = tempfile.mkdtemp(prefix=f"kvmkit-{os.environ.get('PYTEST_XDIST_WORKER', 'run')}-")
    os.environ["XDG_RUNTIME_DIR"] = config._kvmkit_runtime


def pytest_unconfigure(config):
    runtime = getattr(config, "_kvmkit_runtime", None)
    if runtime:
        shutil.rmtree(runtime, ignore_errors=True)
