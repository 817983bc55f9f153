#!/usr/bin/env python3
"""Start-up: ``kvmkit run`` to its first KVM_RUN, ``kvmkit --version`` and
``kvmkit plugins``, each run interleaved with its peers: a bare ``python -c
pass`` and a bare import of the modules a start-up cannot avoid.

Wall time is from spawning the process to the line ``vcpu0: first KVM_RUN``
on its stderr (or to its exit); CPU time is the process's own (all threads:
/proc/PID/task/*/schedstat at that line, or the exit's rusage).  The machine is
bench/startup.py's usual one: the kit's small kernel and busybox initramfs,
256 MiB, 2 vCPUs, a serial port logging to a file, plus the default RTC and
i8042.  Bytecode caching is on for the children (PYTHONDONTWRITEBYTECODE is
dropped from their environment, and one untimed round writes the caches).

    .venv/bin/python bench/startup.py [--runs 7] [--kernel PATH] [--initrd PATH]
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from report import Figure, table  # noqa: E402

# What any kvmkit start-up imports besides kvmkit itself: the floor under
# `kvmkit run` that kvmkit's own code cannot lower.
BARE_IMPORTS = "import argparse, logging, threading, mmap, tomllib, dataclasses, pluggy, _cffi_backend"
MARKER = "vcpu0: first KVM_RUN"


def _env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def kvmkit_command() -> list[str]:
    script = Path(sys.executable).with_name("kvmkit")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kvmkit"]


def _task_cpu_ns(pid: int) -> int:
    total = 0
    for stat in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(stat) as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def until_exit(argv: list[str]) -> tuple[float, float]:
    """(wall ms, CPU ms) of a command that exits by itself."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited with status {proc.returncode}")
    return wall * 1e3, (usage.ru_utime + usage.ru_stime) * 1e3


def until_first_kvm_run(argv: list[str]) -> tuple[float, float]:
    """(wall ms, CPU ms) from spawning ``kvmkit -vv run ...`` to its first KVM_RUN."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:
            if MARKER in line:
                wall = time.perf_counter() - t0
                return wall * 1e3, _task_cpu_ns(proc.pid) / 1e6
            lines.append(line)
        raise SystemExit(f"kvmkit exited ({proc.wait()}) before its first KVM_RUN:\n" + "".join(lines[-5:]))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def default_machine() -> tuple[Path | None, Path | None]:
    from guest import kit
    k = kit()
    kernel = next((k[key] for key in ("SMALL_VMLINUX", "ACPI_VMLINUX")
                   if k.get(key) is not None and k[key].is_file()), None)
    initrd = k.get("BUSYBOX_CPIO")
    return kernel, initrd if initrd is not None and initrd.is_file() else None


def measure(runs: int, kernel: Path, initrd: Path | None) -> list[Figure]:
    kvmkit = kvmkit_command()
    with tempfile.TemporaryDirectory() as d:
        run = [*kvmkit, "-vv", "run", "--name", f"bench-startup-{os.getpid()}", "--kernel", str(kernel), "--memory", "256M", "--vcpus", "2",
               "--device", f"serial8250,backend=file,path={os.path.join(d, 'console.log')}"]
        if initrd is not None:
            run += ["--initrd", str(initrd)]
        steps = {
            "pass": lambda: until_exit([sys.executable, "-c", "pass"]),
            "imports": lambda: until_exit([sys.executable, "-c", BARE_IMPORTS]),
            "version": lambda: until_exit([*kvmkit, "--version"]),
            "plugins": lambda: until_exit([*kvmkit, "plugins"]),
            "run": lambda: until_first_kvm_run(run),
        }
        for step in steps.values():                # untimed: page cache, bytecode caches
            step()
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in steps}
        for _ in range(runs):                      # interleaved, so each peer sees the same load
            for name, step in steps.items():
                got[name].append(step())

    def wall(k):
        return [w for w, _ in got[k]]

    def cpu(k):
        return [c for _, c in got[k]]

    g = "start-up"
    what = f"{kernel.name}{' + ' + initrd.name if initrd else ''}, 256M, 2 vCPUs, serial/rtc/i8042"
    return [
        Figure(g, "`kvmkit run` -> first KVM_RUN, wall", "ms", wall("run"), "`python -c pass`", wall("pass"),
               note=what),
        Figure(g, "`kvmkit run` -> first KVM_RUN, wall", "ms", wall("run"), "bare imports", wall("imports")),
        Figure(g, "`kvmkit run` -> first KVM_RUN, CPU", "ms", cpu("run"), "`python -c pass` CPU", cpu("pass")),
        Figure(g, "`kvmkit --version`, wall", "ms", wall("version"), "`python -c pass`", wall("pass")),
        Figure(g, "`kvmkit --version`, CPU", "ms", cpu("version"), "`python -c pass` CPU", cpu("pass")),
        Figure(g, "`kvmkit plugins`, wall", "ms", wall("plugins"), "`python -c pass`", wall("pass")),
        Figure(g, "`kvmkit plugins`, CPU", "ms", cpu("plugins"), "`python -c pass` CPU", cpu("pass")),
        Figure(g, "bare imports, wall", "ms", wall("imports"), "`python -c pass`", wall("pass"),
               note=BARE_IMPORTS.removeprefix("import ")),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--initrd", type=Path, default=None)
    a = ap.parse_args()
    kernel, initrd = default_machine()
    kernel, initrd = a.kernel or kernel, a.initrd or (initrd if a.kernel is None else None)
    if kernel is None:
        raise SystemExit("no kernel: build the kit (guest/build-kit) or pass --kernel")
    from machine_info import describe
    print(describe())
    print()
    print(table(measure(a.runs, kernel, initrd)))


if __name__ == "__main__":
    main()
