#!/usr/bin/env python3
"""The VMM's own cost per port-I/O exit.

A tiny 64-bit guest loops on ``out 0x10, al`` N times, then writes port 0x11.
Reported: wall time per exit (KVM round trip + kvmkit), and the time spent in
kvmkit's exit handling alone (handle_exit: decode, bus lookup, device lock,
device call).  No Linux, no plugins: a counting device on the PIO bus.

    .venv/bin/python bench/pio_exit.py [--exits 200000]
"""
from __future__ import annotations

import argparse
import threading
import time
from types import SimpleNamespace

from kvmkit.boot import pagetables
from kvmkit.bus import Bus
from kvmkit.hypervisor import cpu_setup, host_quirks
from kvmkit.hypervisor.kvm import Kvm
from kvmkit.machine import IDENTITY_MAP_ADDR, TSS_ADDR
from kvmkit.memory import GuestMemory
from kvmkit.vcpu import handle_exit
from machine_info import describe  # bench/ is on sys.path when run as a script

CODE_AT = 0x100000


def guest_code(n: int) -> bytes:
    return (b"\xb9" + n.to_bytes(4, "little")   # mov ecx, n
            + b"\xe6\x10"                        # loop: out 0x10, al
            + b"\xff\xc9"                        # dec ecx
            + b"\x75\xfa"                        # jnz loop
            + b"\xe6\x11"                        # out 0x11, al   (done)
            + b"\xeb\xfe")                       # jmp .


class Counter:
    def __init__(self):
        self.count = 0
        self.done = False

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        if offset == 0:
            self.count += 1
        else:
            self.done = True


def measure(n: int) -> dict:
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory(16 << 20)
    vm.map_memory(mem)
    vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
    vm.set_tss_addr(TSS_ADDR)
    vm.create_irqchip()
    gdt_base, gdt_limit = pagetables.write_gdt(mem)
    cr3 = pagetables.write_identity_map(mem)
    mem.write(CODE_AT, guest_code(n))
    boot = SimpleNamespace(entry=CODE_AT, boot_params=0, cr3=cr3, gdt_base=gdt_base, gdt_limit=gdt_limit)
    vcpu = vm.create_vcpu(0)
    cpu_setup.setup_vcpu(vcpu, kvm.supported_cpuid(), 1, boot)
    pio, mmio = Bus("pio"), Bus("mmio")
    dev = Counter()
    pio.add(0x10, 2, dev, threading.RLock(), "counter")
    quirks = host_quirks.detect()
    handler = 0.0
    t0 = time.perf_counter()
    while not dev.done:
        r = vcpu.run_once()
        if r < 0:
            continue
        h0 = time.perf_counter()
        stop = handle_exit(vcpu, pio, mmio, quirks)
        handler += time.perf_counter() - h0
        if stop is not None:
            raise SystemExit(f"guest stopped: {stop.reason}")
    wall = time.perf_counter() - t0
    exits = dev.count + 1
    vcpu.close()
    vm.close()
    kvm.close()
    return {"exits": exits, "wall_us": wall / exits * 1e6, "handler_us": handler / exits * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    results = [measure(args.exits) for _ in range(args.runs)]
    best = min(results, key=lambda r: r["wall_us"])
    print(describe())
    print(f"port-I/O exits: {best['exits']} per run, best of {args.runs}")
    print(f"  wall per exit (KVM round trip + kvmkit): {best['wall_us']:.2f} us")
    print(f"  kvmkit handling per exit (handle_exit):  {best['handler_us']:.2f} us")


if __name__ == "__main__":
    main()
