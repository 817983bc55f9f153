"""Every plugin distribution in this repository passes `pytest --kvmkit-contract`
(run once, in a subprocess, for all of them: each option names a project
folder, as a plugin author's own run finds the project it stands in)."""
import os
import subprocess
import sys
import tomllib
import importlib.metadata
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from kvmkit.contract import CHECKS
from requirement import need

ROOT = Path(__file__).resolve().parents[2]
GROUP = "kvmkit.devices"


def _projects() -> dict[str, tuple[str, list[str]]]:
    """folder -> (distribution, kinds) of every plugin project in the repository."""
    out = {}
    for pattern in ("plugins/*/pyproject.toml", "native/*/pyproject.toml", "examples/*/pyproject.toml"):
        for path in sorted(ROOT.glob(pattern)):
            project = tomllib.loads(path.read_text())["project"]
            kinds = sorted(project.get("entry-points", {}).get(GROUP, {}))
            if kinds:
                out[str(path.parent.relative_to(ROOT))] = (project["name"], kinds)
    return out


PROJECTS = _projects()


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


INSTALLED = {folder: v for folder, v in PROJECTS.items() if _installed(v[0])}


def test_the_repository_plugins_are_found():
    assert {"plugins/rtc", "plugins/rtc_fixed", "plugins/serial8250", "plugins/i8042",
            "plugins/virtio_blk", "plugins/virtio_fs", "examples/virtio_rng"} <= set(PROJECTS)
    assert PROJECTS["plugins/rtc_fixed"] == ("kvmkit-rtc-fixed", ["rtc-fixed"])


@pytest.fixture(scope="module")
def contract_run(tmp_path_factory):
    report = tmp_path_factory.mktemp("contract") / "report.xml"
    args = [f"--kvmkit-contract={folder}" for folder in INSTALLED]
    # The plugins' test folders hold their conftest hooks (example tables);
    # repo_contract_configs has them for plugins whose folders do not.
    args += [f"{folder}/tests" for folder in INSTALLED if (ROOT / folder / "tests").is_dir()]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                        "-p", "repo_contract_configs", "-m", "kvmkit_contract",
                        f"--junitxml={report}", *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    results = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        failure = case.find("failure")
        results[case.get("name")] = failure.get("message") if failure is not None else "passed"
    return r, results


@pytest.mark.parametrize("folder", sorted(PROJECTS))
def test_plugin_passes_the_contract(contract_run, folder):
    distribution, kinds = PROJECTS[folder]
    need(folder in INSTALLED,
         f"{distribution} is not installed (scripts/setup installs every plugin folder)")
    r, results = contract_run
    for kind in kinds:
        for check in CHECKS:
            outcome = results.get(f"{check}[{kind}]", "not run")
            assert outcome == "passed", f"{distribution}: {check}[{kind}]: {outcome}\n{r.stdout[-3000:]}"


def test_the_run_ran_only_contract_checks(contract_run):
    r, results = contract_run
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert len(results) == len(CHECKS) * sum(len(k) for _, k in INSTALLED.values())
