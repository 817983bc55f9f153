"""Every benchmark in one go, as one markdown table (``bench/run`` or
``python -m bench`` from the repository root).

Each figure is given as its median (min-max) over ``--runs`` runs next to its
peer measured in the same runs: a bare ``python -c pass`` and the bare imports
for start-up, the C exit floor on the identical guest for the port-I/O exit,
raw pread/pwrite for virtio-blk.  Figures marked *(diagnostic)* are busy time
(what a component spent, not what a user or guest waits for).

    .venv/bin/python -m bench [--runs 5] [--quick] [--only startup,exit,blk,memory]
                              [--kernel PATH] [--initrd PATH]
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

GROUPS = ("startup", "exit", "blk", "memory")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    ap.add_argument("--quick", action="store_true",
                    help="tiny parameters: checks that everything runs, measures nothing useful")
    ap.add_argument("--only", default=",".join(GROUPS), help=f"comma-separated subset of {', '.join(GROUPS)}")
    ap.add_argument("--kernel", type=Path, help="kernel for start-up and memory (default: the kit's)")
    ap.add_argument("--initrd", type=Path, help="initrd for start-up and memory")
    ap.add_argument("--dir", default="/var/tmp", help="where virtio-blk's image goes (not tmpfs)")
    args = ap.parse_args(argv)
    only = [g.strip() for g in args.only.split(",") if g.strip()]
    unknown = [g for g in only if g not in GROUPS]
    if unknown:
        ap.error(f"--only: unknown group {unknown[0]!r} (choose from {', '.join(GROUPS)})")
    runs = max(1, args.runs)

    from machine_info import describe
    from report import table
    started = time.monotonic()
    load_before = os.getloadavg()
    figures, notes = [], []

    kernel, initrd = args.kernel, args.initrd
    if ("startup" in only or "memory" in only) and kernel is None:
        from startup import default_machine
        kernel, initrd = default_machine()
        if kernel is None:
            notes.append("start-up and memory skipped: no kernel (build the kit or pass --kernel)")
            only = [g for g in only if g not in ("startup", "memory")]

    if "startup" in only:
        import startup
        figures += startup.measure(runs if not args.quick else 1, kernel, initrd)
    if "exit" in only:
        import pio_exit
        figures += pio_exit.measure(1000 if args.quick else 100_000, runs if not args.quick else 1)
    if "blk" in only:
        import blk_queue
        if args.quick:
            figures += blk_queue.measure(0.05, 1, size=8 << 20, directory=args.dir,
                                         cases=blk_queue.CASES[:1], poll_us=100)
        else:
            figures += blk_queue.measure(0.5, runs, size=256 << 20, directory=args.dir, poll_us=1000)
    if "memory" in only:
        import memory
        figures += memory.measure(1 if args.quick else max(3, runs // 2), kernel, initrd,
                                  settle=0.05 if args.quick else 0.5)

    load_after = os.getloadavg()
    print(f"kvmkit benchmarks, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
          f"{' (--quick: not measurements)' if args.quick else ''}")
    print(describe())
    print(f"load average (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after; "
          f"{time.monotonic() - started:.0f} s; median (min-max) over the runs, n = runs")
    for note in notes:
        print(note)
    print()
    print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
