"""Every hook in core/hookspecs.py has a spec marker, a docstring, a section in
docs/hooks.md (with the spec's arguments) and a test that calls it (the
registry below, checked against the test files)."""
import ast
import inspect
import re
from pathlib import Path

import pytest

from kvmkit import hookspecs

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "hooks.md"

# hook -> tests that call it (path::function); each must exist and name the hook
HOOK_TESTS = {
    "kvmkit_device_spec": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_device_spec_may_name_several_kinds"],
    "kvmkit_check_device": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_check_device_problems_are_all_reported"],
    "kvmkit_create_device": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_create_device_first_result_wins"],
    "kvmkit_kernel_cmdline": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_kernel_cmdline_adds_words_the_user_did_not_write"],
    "kvmkit_unhandled_io": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_unhandled_io_claims_and_declines"],
    "kvmkit_vm_started": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_vm_started_and_kvmkit_vm_stopped_bracket_the_run",
        "tests/integration/test_plugin_failures.py::test_kvmkit_vm_started_and_kvmkit_vm_stopped_ran"],
    "kvmkit_vm_stopped": [
        "tests/contract/test_hook_behaviour.py::test_kvmkit_vm_started_and_kvmkit_vm_stopped_bracket_the_run",
        "tests/integration/test_plugin_failures.py::test_kvmkit_vm_started_and_kvmkit_vm_stopped_ran"],
}


def hooks():
    return {name: fn for name, fn in vars(hookspecs).items()
            if name.startswith("kvmkit_") and inspect.isfunction(fn)}


HOOKS = sorted(hooks())


def test_the_hookspecs_module_has_hooks():
    assert {"kvmkit_device_spec", "kvmkit_create_device"} <= set(HOOKS)


def test_registry_covers_exactly_the_hooks():
    assert set(HOOK_TESTS) == set(HOOKS)


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_spec_marker_and_a_docstring(name):
    fn = hooks()[name]
    assert isinstance(getattr(fn, "kvmkit_spec", None), dict), f"{name} lacks @hookspec"
    assert fn.__doc__ and len(fn.__doc__.strip()) > 40, f"{name} needs a docstring"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented_with_its_arguments(name):
    text = DOCS.read_text()
    args = ", ".join(inspect.signature(hooks()[name]).parameters)
    heading = re.search(rf"^## `{name}\(([^)]*)\)`(.*)$", text, re.M)
    assert heading, f"docs/hooks.md has no '## `{name}({args})`' section"
    assert heading.group(1) == args, f"docs/hooks.md: {name}({heading.group(1)}) but the spec takes ({args})"
    first_result = bool(hooks()[name].kvmkit_spec.get("firstresult"))
    assert ("first result" in heading.group(2)) == first_result, \
        f"docs/hooks.md: mark {name} 'first result' exactly when the spec is firstresult"


def test_docs_name_no_hook_that_does_not_exist():
    documented = set(re.findall(r"^## `(kvmkit_\w+)\(", DOCS.read_text(), re.M))
    assert documented == set(HOOKS)


def _function_source(path: Path, function: str) -> str | None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == function:
            return ast.get_source_segment(path.read_text(), node)
    return None


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_exercised_by_a_test(name):
    for nodeid in HOOK_TESTS[name]:
        file, _, function = nodeid.partition("::")
        path = ROOT / file
        assert path.is_file(), f"{name}: {file} does not exist"
        source = _function_source(path, function)
        assert source is not None, f"{name}: {nodeid} does not exist"
        assert name in source, f"{name}: {nodeid} does not mention the hook it covers"
