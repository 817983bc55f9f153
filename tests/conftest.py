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
# The line travels as a user property of the test's report, so that it reaches
# the terminal summary from pytest-xdist's workers too.
_FUZZ_LINES: list[str] = []
_FUZZ_PROPERTY = "kvmkit-fuzz-inputs"


@pytest.fixture
def fuzz_report(request):
    """fuzz_report(line): a line printed in the terminal summary (the input count)."""
    return lambda line: request.node.user_properties.append((_FUZZ_PROPERTY, line))


def pytest_runtest_logreport(report):
    if report.when == "call":
        lines = [value for name, value in report.user_properties if name == _FUZZ_PROPERTY]
        _FUZZ_LINES.extend(lines)


def pytest_terminal_summary(terminalreporter, config):
    if _FUZZ_LINES:
        terminalreporter.section("fuzz inputs")
        for line in _FUZZ_LINES:
            terminalreporter.write_line(line)
