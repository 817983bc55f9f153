"""What each command imports: start-up time is a feature (issue 17), so a
command must not load the code of commands it does not run."""
import subprocess
import sys
import textwrap

import pytest

ROOT_MODULES = ("kvmkit.machine", "kvmkit.hypervisor.kvm", "kvmkit.plugins", "kvmkit.config",
                "kvmkit.control", "pluggy", "tomllib",
                "shutil")          # argparse's default help formatter imports it (and zlib, bz2, lzma)


def imported_after(argv: list[str], tmp_path) -> set[str]:
    code = textwrap.dedent(f"""
        import sys
        from kvmkit.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print("\\n".join(sys.modules))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, stdin=subprocess.DEVNULL)
    return set(r.stdout.split())


def test_version_loads_no_machine_plugin_or_kvm_code(tmp_path):
    loaded = imported_after(["--version"], tmp_path)
    assert "kvmkit.cli" in loaded
    assert not loaded & set(ROOT_MODULES), sorted(loaded & set(ROOT_MODULES))


def test_list_loads_no_machine_or_kvm_code(tmp_path):
    loaded = imported_after(["list"], tmp_path)
    assert "kvmkit.control" in loaded
    assert not loaded & {"kvmkit.machine", "kvmkit.hypervisor.kvm", "kvmkit.plugins"}


@pytest.mark.parametrize("argv", [["plugins"], ["check", "--kernel", "missing"]])
def test_plugin_listing_and_checks_load_no_kvm_or_machine_code(argv, tmp_path):
    loaded = imported_after(argv, tmp_path)
    assert "kvmkit.plugins" in loaded
    assert not loaded & {"kvmkit.machine", "kvmkit.hypervisor.kvm"}, sorted(loaded)
