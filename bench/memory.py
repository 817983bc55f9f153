#!/usr/bin/env python3
"""Memory: the VMM's resident memory beyond guest RAM, and guest RAM left
untouched until the guest touches it.

Each case starts ``kvmkit run``, waits for the first KVM_RUN and a moment
more, and reads /proc/PID/smaps: the guest RAM mapping's resident size (what
the loader wrote: kernel, initrd, boot tables) and everything else (the VMM:
the interpreter, kvmkit, plugins, threads' stacks, libraries).  Cases: the
demo machine's devices (serial, RTC, i8042); every device kind in the repo
(adds pvpanic, virtio-blk on a 64 MiB image, virtio-net with user
networking, virtio-rng if installed); and the demo machine with a 4 GiB guest.

    .venv/bin/python bench/memory.py [--runs 5] [--kernel PATH] [--initrd PATH]
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import Figure, table  # noqa: E402
from startup import MARKER, _env, default_machine, kvmkit_command  # noqa: E402

MIB = 1 << 20


def smaps(pid: int, guest_bytes: int) -> tuple[float, float]:
    """(guest RAM resident MiB, everything else resident MiB)."""
    guest = other = 0
    size = rss = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key == "Size":
                size = int(rest.split()[0]) * 1024
            elif key == "Rss":
                rss = int(rest.split()[0]) * 1024
                if size == guest_bytes and guest == 0:
                    guest = rss
                else:
                    other += rss
    return guest / MIB, other / MIB


def sample(argv: list[str], guest_bytes: int, settle: float) -> tuple[float, float]:
    proc = subprocess.Popen(argv, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if MARKER in line:
                time.sleep(settle)
                return smaps(proc.pid, guest_bytes)
        raise SystemExit(f"kvmkit exited ({proc.wait()}) before its first KVM_RUN")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def every_device(d: str) -> list[str]:
    image = os.path.join(d, "disk.img")
    with open(image, "wb") as f:
        f.truncate(64 * MIB)
    from kvmkit.plugins import installed_kinds
    kinds = installed_kinds()
    flags = ["--device", "pvpanic", "--device", f"virtio-blk,path={image}",
             "--device", "virtio-net,backend=user"]
    if "virtio-rng" in kinds:
        flags += ["--device", "virtio-rng"]
    return flags


def measure(runs: int, kernel: Path, initrd: Path | None, settle: float = 0.5) -> list[Figure]:
    kvmkit = kvmkit_command()
    with tempfile.TemporaryDirectory() as d:
        def machine(name, memory, extra=()):
            argv = [*kvmkit, "-vv", "run", "--name", f"bench-mem-{name}-{os.getpid()}",
                    "--kernel", str(kernel), "--memory", memory, "--vcpus", "2",
                    "--device", f"serial8250,backend=file,path={os.path.join(d, name + '.log')}", *extra]
            return argv + (["--initrd", str(initrd)] if initrd else [])
        cases = {
            "demo": (machine("demo", "256M"), 256 * MIB),
            "all": (machine("all", "256M", every_device(d)), 256 * MIB),
            "4g": (machine("4g", "4G"), 4096 * MIB),
        }
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in cases}
        for _ in range(runs):
            for name, (argv, guest) in cases.items():
                got[name].append(sample(argv, guest, settle))
    g = "memory"
    vmm = {k: [o for _, o in v] for k, v in got.items()}
    guest = {k: [r for r, _ in v] for k, v in got.items()}
    return [
        Figure(g, "VMM RSS beyond guest RAM, demo devices (serial, rtc, i8042)", "MiB", vmm["demo"]),
        Figure(g, "VMM RSS beyond guest RAM, every device (+pvpanic, virtio-blk, virtio-net, virtio-rng)",
               "MiB", vmm["all"]),
        Figure(g, "VMM RSS beyond guest RAM, 4 GiB guest", "MiB", vmm["4g"]),
        Figure(g, "guest RAM resident after start, 4 GiB guest (kernel, initrd, tables)", "MiB",
               guest["4g"]),
        Figure(g, "guest RAM resident after start, 256 MiB guest", "MiB", guest["demo"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
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
