#!/usr/bin/env python3
"""Guest-visible I/O: what programs inside a guest get from virtio-blk and
virtio-net, with each figure next to the host doing the same work.

virtio-blk: the kit's small kernel boots with a raw disk image, once per
queue backend (python, native); inside the guest ``kvmkit-io`` (the kit's
static fio-like tool, guest/kvmkit-io.c) runs sequential 64 KiB reads and
writes and random 4 KiB reads and writes with O_DIRECT on /dev/vda, one
request in flight, for a fixed time each.  The peer is the same tool, same
arguments, run on the host against the same image file in the same run.

virtio-net: the guest sends a stream of zeros with busybox ``nc`` to a host
listener through user-mode networking (slirp) and reports the wall time it
took from its /proc/uptime; the host counts the bytes.

On a nested paravirtual KVM host (the project's CI machines) the guest
kernel's side of every system call and interrupt runs in KVM's instruction
emulator, so the guest figures there measure mostly that emulator: compare
python with native on the same host, not with the host's raw path.

    .venv/bin/python bench/guest_io.py [--seconds 3] [--runs 1] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "integration"))

import machine_info  # noqa: E402
from guest import initrd_with_hooks, kit, machine_file, run_kvmkit  # noqa: E402

CASES = [("seqread", 65536), ("seqwrite", 65536), ("randread", 4096), ("randwrite", 4096)]
LINE = re.compile(r"kvmkit-io: (\w+) bs=(\d+) ops=(\d+) seconds=([\d.]+) iops=(\d+) mbps=([\d.]+)")


def blk_hook(seconds: float, span_mib: int) -> str:
    runs = "\n".join(f"kvmkit-io {mode} /dev/vda {bs} {seconds} {span_mib}" for mode, bs in CASES)
    return f"#!/bin/sh\n{runs}\n"


def net_hook(port: int, mib: int) -> str:
    return ("#!/bin/sh\n"
            "t0=$(cut -d' ' -f1 /proc/uptime)\n"
            f"dd if=/dev/zero bs=64k count={mib * 16} 2>/dev/null | nc -w 5 10.0.2.2 {port}\n"
            "t1=$(cut -d' ' -f1 /proc/uptime)\n"
            "echo \"kvmkit-net: sent seconds=$(awk \"BEGIN {print $t1 - $t0}\")\"\n")


def parse(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(5)) if m.group(1).startswith("rand") else float(m.group(6))
            for m in LINE.finditer(text)}


def guest_blk(k, d: Path, image: Path, queue: str, seconds: float, span: int) -> dict[str, float]:
    initrd = initrd_with_hooks(k, d / f"blk-{queue}.cpio", {"io": blk_hook(seconds, span)}, tools=True)
    m = machine_file(d / f"blk-{queue}.toml", image=k["SMALL_VMLINUX"], initrd=initrd,
                     cmdline="console=ttyS0 panic=-1 reboot=k",
                     extra_devices=[{"kind": "virtio-blk", "path": str(image), "queue": queue,
                                     "cache": "none"}])
    boot = run_kvmkit(["run", str(m)], timeout=1800)
    got = parse(boot.console)
    if len(got) != len(CASES):
        sys.exit(f"guest_io: the {queue} guest did not report every case:\n{boot.describe()}")
    return got


def host_blk(image: Path, seconds: float, span: int) -> dict[str, float]:
    tool = Path(kit()["KVMKIT_CACHE"]) / "build" / "stage" / "tools" / "bin" / "kvmkit-io"
    out = ""
    for mode, bs in CASES:
        out += subprocess.run([str(tool), mode, str(image), str(bs), str(seconds), str(span)],
                              capture_output=True, text=True, check=True).stdout
    return parse(out)


def guest_net(k, d: Path, mib: int) -> tuple[float, float]:
    """(guest-reported MB/s, host-received MB/s over the same guest interval)."""
    sink = socket.create_server(("127.0.0.1", 0))
    got = {"bytes": 0}

    def take():
        conn, _ = sink.accept()
        with conn:
            while chunk := conn.recv(1 << 20):
                got["bytes"] += len(chunk)
    threading.Thread(target=take, daemon=True).start()
    initrd = initrd_with_hooks(k, d / "net.cpio", {"net": net_hook(sink.getsockname()[1], mib)})
    m = machine_file(d / "net.toml", image=k["SMALL_VMLINUX"], initrd=initrd,
                     cmdline="console=ttyS0 panic=-1 reboot=k ip=dhcp",
                     extra_devices=[{"kind": "virtio-net"}])
    boot = run_kvmkit(["run", str(m)], timeout=1800)
    sink.close()
    found = re.search(r"kvmkit-net: sent seconds=([\d.]+)", boot.console)
    if not found or got["bytes"] != mib << 20:
        sys.exit(f"guest_io: the network guest did not send {mib} MiB ({got['bytes']} arrived):\n"
                 f"{boot.describe()}")
    secs = float(found.group(1))
    return (mib << 20) / secs / 1e6, secs


def spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:,.0f}"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="per case (default 3)")
    ap.add_argument("--runs", type=int, default=1, help="boots per queue backend (default 1)")
    ap.add_argument("--size", type=int, default=256, help="image MiB (default 256)")
    ap.add_argument("--net-mib", type=int, default=16, help="MiB the guest sends (default 16)")
    args = ap.parse_args()
    k = kit()
    if not k.get("SMALL_VMLINUX") or not Path(k["SMALL_VMLINUX"]).exists():
        sys.exit("guest_io: the guest kit is not built: run guest/build-kit")
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:
        d = Path(tmp)
        image = d / "disk.img"
        with open(image, "wb") as f:
            f.write(os.urandom(1 << 20) * args.size)
        results: dict[str, dict[str, list[float]]] = {q: {} for q in ("python", "native", "host")}
        t0 = time.monotonic()
        for _ in range(args.runs):
            for queue in ("python", "native"):
                for case, v in guest_blk(k, d, image, queue, args.seconds, args.size).items():
                    results[queue].setdefault(case, []).append(v)
            for case, v in host_blk(image, args.seconds, args.size).items():
                results["host"].setdefault(case, []).append(v)
        net = [guest_net(k, d, args.net_mib) for _ in range(args.runs)]
    print(machine_info.describe())
    print(f"guest_io: {args.runs} boot(s) per backend, {args.seconds:g} s per case, "
          f"{args.size} MiB image, O_DIRECT, one request in flight; {time.monotonic() - t0:.0f} s in all\n")
    print("| case (unit) | guest, python queue | guest, native queue | host, same tool and file | native / host |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for mode, bs in CASES:
        unit = "IOPS" if mode.startswith("rand") else "MB/s"
        py, nat, host = (results[q][mode] for q in ("python", "native", "host"))
        ratio = statistics.median(nat) / statistics.median(host)
        print(f"| {mode} {bs // 1024} KiB ({unit}) | {spread(py)} | {spread(nat)} | {spread(host)} | {ratio:.1%} |")
    rates = [r for r, _ in net]
    print(f"| TCP stream guest->host over slirp, {args.net_mib} MiB (MB/s) | | {spread(rates)} | | |")


if __name__ == "__main__":
    main()
