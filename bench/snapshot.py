#!/usr/bin/env python3
"""Snapshot and restore times (issue 19) on a hand-made guest.

A 64-bit guest of a few bytes with ``--memory`` of RAM, ``--touched`` MiB
of it filled (as a booted guest's kernel, page cache and programs would be),
counting and writing each count to a port.  Reported:

* snapshot: ``kvmkit.snapshot.take`` (pause, state, memory written, fsync'd)
  and the snapshot's size on disk;
* restore, in process: reading the snapshot to the first KVM_RUN (the build:
  memory mapped, vCPU and VM state set) and to the guest's next port write;
* restore, the command: ``kvmkit -vv run --restore`` from exec to its log's
  "first KVM_RUN" (Python start-up and imports included);
* N guests restored from one snapshot at once, each reading all the filled
  memory: their summed proportional set size (PSS: pages shared through the
  page cache are split among them) against one guest's.

    .venv/bin/python bench/snapshot.py [--runs 3] [--memory 256] [--touched 64] [--guests 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

import tiny  # noqa: E402
from kvmkit import snapshot, snapshot_format  # noqa: E402
from kvmkit.config import KernelConfig, MachineConfig  # noqa: E402
from kvmkit.machine import Machine  # noqa: E402
from report import Figure, table  # noqa: E402

PORT = 0x510
FILLED_AT = 32 << 20


def count_code(touched_mib: int) -> bytes:
    """loop: count in rbx; read one page of the filled memory (cycling through
    it, as a working set); write the count to PORT."""
    pages = touched_mib * 256
    assert pages & (pages - 1) == 0, "--touched must be a power of two"
    code = bytes([0x48, 0xFF, 0xC3,                                   # inc rbx
                  0x48, 0x89, 0xD8,                                   # mov rax, rbx
                  0x25]) + (pages - 1).to_bytes(4, "little") + bytes([  # and eax, pages - 1
                  0x48, 0xC1, 0xE0, 0x0C,                             # shl rax, 12
                  0x8A, 0x88]) + FILLED_AT.to_bytes(4, "little") + bytes([  # mov cl, [rax + FILLED_AT]
                  0x89, 0xD8,                                         # mov eax, ebx
                  0x66, 0xBA, PORT & 0xFF, PORT >> 8,                 # mov dx, PORT
                  0xEF])                                              # out dx, eax
    return code + bytes([0xEB, (-(len(code) + 2)) & 0xFF])            # jmp loop


class Port:
    def __init__(self):
        self.first = threading.Event()
        self.at = 0.0

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        if not self.first.is_set():
            self.at = time.perf_counter()
            self.first.set()


def make_snapshot(path: Path, memory_mib: int, touched_mib: int) -> float:
    cfg = MachineConfig("bench-snap", memory_mib << 20, 1, KernelConfig(Path("/nonexistent"), None, ""))
    m = Machine(cfg)
    m.build_platform()
    tiny.long_mode(m, count_code(touched_mib))
    chunk = os.urandom(1 << 20)
    for i in range(touched_mib):
        m.memory.write(FILLED_AT + (i << 20), chunk)
    port = Port()
    m.pio.add(PORT, 4, port, threading.RLock(), "bench")
    took = {}

    def snap():
        port.first.wait(30)
        t = time.perf_counter()
        snapshot.take(m, path)
        took["s"] = time.perf_counter() - t
        m.request_stop("bench done", 0)

    t = threading.Thread(target=snap)
    t.start()
    tiny.run(m, timeout=60)
    t.join()
    return took["s"]


def restore_in_process(path: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    snap = snapshot_format.read(path)
    m = Machine(snap.config)
    m.build(snap)
    built = time.perf_counter()
    port = Port()
    m.pio.add(PORT, 4, port, threading.RLock(), "bench")
    threading.Thread(target=lambda: (port.first.wait(30), m.request_stop("bench done", 0))).start()
    tiny.run(m, timeout=60)
    return (built - t0) * 1e3, (port.at - t0) * 1e3


def restore_command(path: Path, name: str, hold: bool = False):
    """Start ``kvmkit run --restore``; the ms to its first KVM_RUN, and the process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "-vv", "run", "--restore", str(path),
                             "--name", name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ms = None
    for line in proc.stderr:
        if "first KVM_RUN" in line:
            ms = (time.perf_counter() - t0) * 1e3
            break
    if not hold:
        proc.terminate()
        proc.wait(10)
    return ms, proc


def pss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--memory", type=int, default=256, help="guest MiB")
    ap.add_argument("--touched", type=int, default=64, help="MiB of guest memory filled")
    ap.add_argument("--guests", type=int, default=8, help="guests restored at once")
    ap.add_argument("--dir", default="/var/tmp", help="where the snapshots go (not tmpfs)")
    args = ap.parse_args(argv)
    take, size, built, first_out, command = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        for run in range(args.runs):
            path = Path(d) / f"snap{run}"
            take.append(make_snapshot(path, args.memory, args.touched) * 1e3)
            size.append(sum(p.stat().st_blocks * 512 for p in path.iterdir()) / (1 << 20))
            b, f = restore_in_process(path)
            built.append(b)
            first_out.append(f)
            ms, _ = restore_command(path, f"bench-restore-{os.getpid()}")
            command.append(ms)
        _ms, alone = restore_command(Path(d) / "snap0", f"bench-alone-{os.getpid()}", hold=True)
        try:
            time.sleep(3)
            one = pss_kib(alone.pid) / 1024
        finally:
            alone.terminate()
            alone.wait(10)
        procs = []
        try:
            for i in range(args.guests):
                _ms, proc = restore_command(Path(d) / "snap0", f"bench-many-{os.getpid()}-{i}", hold=True)
                procs.append(proc)
            time.sleep(3)                      # each guest reads all the filled pages
            each = [pss_kib(p.pid) / 1024 for p in procs]
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
    mem = f"{args.memory} MiB guest, {args.touched} MiB filled"
    figures = [
        Figure("snapshot", f"take ({mem})", "ms", take),
        Figure("snapshot", "size on disk", "MiB", size),
        Figure("snapshot", "restore in process: to first KVM_RUN", "ms", built),
        Figure("snapshot", "restore in process: to the guest's next output", "ms", first_out),
        Figure("snapshot", "`kvmkit run --restore`: exec to first KVM_RUN", "ms", command),
        Figure("snapshot", f"{args.guests} restored guests: summed PSS", "MiB", [sum(each)],
               peer="one guest alone", peer_samples=[one]),
    ]
    print(table(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
