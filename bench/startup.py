#!/usr/bin/env python3
"""Time from ``kvmkit run`` to the first KVM_RUN (interpreter start, plugin
discovery, KVM set-up, kernel load, vCPU set-up), with the kit's small kernel.

    .venv/bin/python bench/startup.py [--runs 5] [--kernel PATH]
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "integration"))
from guest import kit  # noqa: E402
from machine_info import describe  # noqa: E402


def once(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "-vv", "run", *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "vcpu0: first KVM_RUN" in line:
                return time.perf_counter() - t0
        raise SystemExit(f"kvmkit exited ({proc.wait()}) before its first KVM_RUN")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kernel", type=Path, default=None)
    ap.add_argument("--initrd", type=Path, default=None)
    a = ap.parse_args()
    k = kit()
    kernel = a.kernel or k.get("SMALL_VMLINUX")
    initrd = a.initrd or k.get("BUSYBOX_CPIO")
    if kernel is None:
        raise SystemExit("no kernel: build the kit (guest/build-kit) or pass --kernel")
    with tempfile.TemporaryDirectory() as d:
        args = ["--kernel", str(kernel), "--memory", "256M", "--vcpus", "2",
                "--device", f"serial8250,backend=file,path={os.path.join(d, 'console.log')}"]
        if initrd:
            args += ["--initrd", str(initrd)]
        once(args)                                   # warm the page cache
        times = [once(args) for _ in range(a.runs)]
    print(describe())
    print(f"kernel: {kernel}" + (f", initrd: {initrd}" if initrd else ""))
    print(f"kvmkit run -> first KVM_RUN: median {statistics.median(times) * 1000:.0f} ms, "
          f"min {min(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms ({a.runs} runs)")


if __name__ == "__main__":
    main()
