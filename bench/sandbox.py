#!/usr/bin/env python3
"""Time ``kvmkit sandbox -- true`` from start to exit, with a breakdown read
from kvmkit's -vv log as it arrives (host receive times):

  VMM start     kvmkit starts -> the first KVM_RUN (interpreter, plugins, KVM, kernel load)
  kernel boot   -> the guest init opens its job port (root mounted over virtio-fs, init exec'd)
  init          -> the init opens the command's stdout port (mounts, job read; just before exec)
  command+end   -> kvmkit exits (the command, its status, sync, reboot, VM teardown)

    .venv/bin/python bench/sandbox.py [--runs 1] [--kernel PATH] [--memory 256M] [--vcpus 1] [-- CMD...]

The init is built into a temporary cache first (not timed).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from guest import kit  # noqa: E402

MARKS = (("VMM start", "vcpu0: first KVM_RUN"),
         ("kernel boot", "port org.kvmkit.job: opened by the guest"),
         ("init", "port org.kvmkit.stdout: opened by the guest"))


def once(args: list[str], env: dict) -> tuple[int, dict[str, float]]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "-vv", "sandbox", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env)
    seen: dict[str, float] = {}
    for line in proc.stderr:
        for name, needle in MARKS:
            if name not in seen and needle in line:
                seen[name] = time.perf_counter() - t0
    code = proc.wait()
    seen["command+end"] = time.perf_counter() - t0
    return code, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--memory", default="256M")
    ap.add_argument("--vcpus", default="1")
    ap.add_argument("command", nargs="*", default=["true"])
    a = ap.parse_args()
    kernel = a.kernel or kit().get("SMALL_VMLINUX")
    if not kernel or not Path(kernel).exists():
        raise SystemExit("no kernel: build the kit (guest/build-kit) or pass --kernel")
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, KVMKIT_SANDBOX_CACHE=cache)
        from kvmkit.sandbox.guest_init import init_binary
        os.environ["KVMKIT_SANDBOX_CACHE"] = cache
        init_binary()
        rows = []
        for i in range(a.runs):
            code, seen = once(["--kernel", str(kernel), "--memory", a.memory, "--vcpus", a.vcpus,
                               "--", *a.command], env)
            rows.append(seen)
            prev, parts = 0.0, []
            for name in [m for m, _ in MARKS] + ["command+end"]:
                if name in seen:
                    parts.append(f"{name} {seen[name] - prev:.2f} s")
                    prev = seen[name]
            print(f"run {i + 1}: exit {code}, total {seen['command+end']:.2f} s: " + ", ".join(parts))
        if a.runs > 1:
            totals = [r["command+end"] for r in rows]
            print(f"median total {statistics.median(totals):.2f} s "
                  f"({min(totals):.2f}-{max(totals):.2f} s, {a.runs} runs)")


if __name__ == "__main__":
    main()
