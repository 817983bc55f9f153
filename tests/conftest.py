import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))      # requirement.py


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run tests marked slow (many minutes on the nested CI host)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# -- fuzz tests report how many inputs they ran (in every run, not only with -s) -------------
_FUZZ_COUNTS = pytest.StashKey[list]()


@pytest.fixture
def fuzz_report(request):
    """fuzz_report(line): a line printed in the terminal summary (the input count)."""
    lines = request.config.stash.setdefault(_FUZZ_COUNTS, [])
    return lines.append


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(_FUZZ_COUNTS, [])
    if lines:
        terminalreporter.section("fuzz inputs")
        for line in lines:
            terminalreporter.write_line(line)
