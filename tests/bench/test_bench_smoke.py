"""Each benchmark runs with tiny parameters and prints its table (bench/).

Benchmarks are not tests: nothing here asserts a speed, only that every
figure was measured (a number for every run, a same-run peer where the
figure has one) and that the table prints.  A fake kernel stands in for the
kit's: start-up and memory only need kvmkit to reach its first KVM_RUN.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "contract"))
from fake_kernels import elf_kernel  # noqa: E402
from report import table  # noqa: E402

NEED_KVM = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK) and
                              os.environ.get("KVMKIT_REQUIRE_KVM") != "1",
                              reason="/dev/kvm is not usable here")


def check(figures, runs):
    assert figures
    for f in figures:
        assert len(f.samples) == runs and all(math.isfinite(v) for v in f.samples), f
        if f.peer:
            assert len(f.peer_samples) == runs and all(v > 0 for v in f.peer_samples), f
    out = table(figures)
    assert out.count("\n") == len(figures) + 1 and out.startswith("| group | figure |")
    return out


@pytest.fixture
def kernel(tmp_path):
    return elf_kernel(tmp_path / "vmlinux")


@pytest.mark.kvm
@NEED_KVM
def test_startup(kernel):
    import startup
    out = check(startup.measure(1, kernel, None), 1)
    assert "first KVM_RUN" in out and "`python -c pass`" in out


@pytest.mark.kvm
@NEED_KVM
def test_pio_exit_against_the_c_floor():
    import pio_exit
    out = check(pio_exit.measure(500, 1), 1)
    assert "C floor" in out


@pytest.mark.kvm
@NEED_KVM
def test_memory(kernel):
    import memory
    figures = memory.measure(1, kernel, None, settle=0.01)
    check(figures, 1)
    assert all(f.samples[0] > 0 for f in figures)


def test_blk_queue(tmp_path):
    import blk_queue
    figures = blk_queue.measure(0.02, 1, size=4 << 20, directory=str(tmp_path),
                                cases=blk_queue.CASES[:1], poll_us=50)
    out = check(figures, 1)
    assert "raw C pread" in out


def test_bench_run_prints_one_table(tmp_path):
    r = subprocess.run([str(ROOT / "bench" / "run"), "--quick", "--only", "blk", "--dir", str(tmp_path)],
                       env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "| group | figure |" in r.stdout and "virtio-blk" in r.stdout and "CPU:" in r.stdout


@NEED_KVM
def test_snapshot(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "snapshot.py"), "--runs", "1",
                        "--memory", "64", "--touched", "4", "--guests", "2", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| snapshot |")]
    assert len(rows) == 6 and all(" - " not in row.split("|")[4] for row in rows), r.stdout
    assert list(tmp_path.iterdir()) == []
