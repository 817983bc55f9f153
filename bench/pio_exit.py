#!/usr/bin/env python3
"""The VMM's cost per port-I/O exit, against the C floor on the identical guest.

A tiny 64-bit guest loops on ``out 0x10, al`` N times, then writes port 0x11.
Each run builds the VM twice the same way (kvmkit's own KVM, memory, page
tables and vCPU set-up) and runs it once under kvmkit's exit handling (the
vCPU thread's loop: KVM_RUN, count, ``handle_exit``: decode, bus lookup,
device lock, device call) and once under bench/pio_floor.c, a C loop that
only counts the exits: the same guest code, CPU mode and ports, so the
difference is what kvmkit adds.  A third run of the same VM goes through a C
run loop that hands each port write to kvmkit's bus through a Python callback:
what a C dispatch helper in native/ would give.  Reported per exit: wall time
of each and the ratio to the floor; kvmkit's time inside ``handle_exit`` (diagnostic: busy time);
and ``handle_exit`` replayed on the last exit without KVM (diagnostic).
No Linux, no plugins: a counting device on the PIO bus.

    .venv/bin/python bench/pio_exit.py [--exits 200000] [--runs 5]
"""
from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kvmkit.boot import pagetables  # noqa: E402
from kvmkit.bus import Bus  # noqa: E402
from kvmkit.hypervisor import cpu_setup, host_quirks  # noqa: E402
from kvmkit.hypervisor.kvm import Kvm  # noqa: E402
from kvmkit.machine import IDENTITY_MAP_ADDR, TSS_ADDR  # noqa: E402
from kvmkit.memory import GuestMemory  # noqa: E402
from kvmkit.vcpu import VcpuThread, handle_exit  # noqa: E402

from cbuild import load as build_c  # noqa: E402
from report import Figure, table  # noqa: E402

CODE_AT = 0x100000
FLOOR = Path(__file__).with_name("pio_floor.c")


def guest_code(n: int) -> bytes:
    return (b"\xb9" + n.to_bytes(4, "little")   # mov ecx, n
            + b"\xe6\x10"                        # loop: out 0x10, al
            + b"\xff\xc9"                        # dec ecx
            + b"\x75\xfa"                        # jnz loop
            + b"\xe6\x11"                        # out 0x11, al   (done)
            + b"\xeb\xfe")                       # jmp .


class Counter:
    def __init__(self, on_done=lambda: None):
        self.count = 0
        self.done = False
        self.on_done = on_done

    def read(self, offset, size):
        return 0

    def write(self, offset, size, value):
        if offset == 0:
            self.count += 1
        else:
            self.done = True
            self.on_done()


class GuestVm:
    """The benchmark's VM, set up as kvmkit sets up a machine's."""

    def __init__(self, n: int):
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        self.mem = GuestMemory(16 << 20)
        self.vm.map_memory(self.mem)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.create_irqchip()
        gdt_base, gdt_limit = pagetables.write_gdt(self.mem)
        cr3 = pagetables.write_identity_map(self.mem)
        self.mem.write(CODE_AT, guest_code(n))
        boot = SimpleNamespace(entry=CODE_AT, boot_params=0, cr3=cr3, gdt_base=gdt_base,
                               gdt_limit=gdt_limit)
        self.vcpu = self.vm.create_vcpu(0)
        cpu_setup.setup_vcpu(self.vcpu, self.kvm.supported_cpuid(), 1, boot)

    def close(self):
        self.vcpu.close()
        self.vm.close()
        self.kvm.close()
        self.mem.close()


def run_kvmkit(n: int) -> dict:
    """kvmkit's own vCPU loop (VcpuThread.run, in this thread) on a fresh VM."""
    g = GuestVm(n)
    vcpu = g.vcpu
    pio, mmio = Bus("pio"), Bus("mmio")
    stopping, running = threading.Event(), threading.Event()
    running.set()
    dev = Counter(on_done=stopping.set)
    pio.add(0x10, 2, dev, threading.RLock(), "counter")
    stops = []
    machine = SimpleNamespace(pio=pio, mmio=mmio, quirks=host_quirks.detect(), memory=g.mem,
                              stopping=stopping, running=running,
                              request_stop=lambda reason, code=0: (stops.append(reason), stopping.set()))
    thread = VcpuThread(vcpu, machine)
    clock = time.perf_counter
    t0 = clock()
    thread.run()
    wall = clock() - t0
    if stops:
        raise SystemExit(f"guest stopped: {stops[0]}")
    count = dev.count + 1
    if sum(thread.exits.values()) != count:
        raise SystemExit(f"the vCPU loop saw {sum(thread.exits.values())} exits, the device {count}")
    # handle_exit replayed on the last exit (out 0x11), without KVM
    reps = 20000
    r0 = clock()
    for _ in range(reps):
        handle_exit(vcpu, pio, mmio, machine.quirks)
    replay = (clock() - r0) / reps
    g.close()
    return {"exits": count, "wall_us": wall / count * 1e6, "replay_us": replay * 1e6}


def run_floor(n: int, lib, ffi) -> float:
    """The C loop on a fresh, identical VM: wall µs per exit."""
    g = GuestVm(n)
    page = ffi.from_buffer(g.vcpu.run_map)
    t0 = time.perf_counter()
    done = lib.pio_floor(g.vcpu.fd, page)
    wall = time.perf_counter() - t0
    del page
    g.close()
    if done != n + 1:
        raise SystemExit(f"the C floor handled {done} exits, expected {n + 1}")
    return wall / done * 1e6


def run_dispatch(n: int, lib, ffi) -> float:
    """A C run loop handing each port write to the bus through a Python
    callback (what a C dispatch helper in native/ would give): wall µs per exit."""
    g = GuestVm(n)
    pio = Bus("pio")
    dev = Counter()
    pio.add(0x10, 2, dev, threading.RLock(), "counter")
    write = pio.write

    @ffi.callback("int(int, int, unsigned)")
    def on_out(port, size, value):
        write(port, size, value)
        return dev.done

    page = ffi.from_buffer(g.vcpu.run_map)
    t0 = time.perf_counter()
    done = lib.pio_dispatch(g.vcpu.fd, page, on_out)
    wall = time.perf_counter() - t0
    del page
    g.close()
    if done != n + 1:
        raise SystemExit(f"the C dispatch loop handled {done} exits, expected {n + 1}")
    return wall / done * 1e6


def measure(exits: int, runs: int) -> list[Figure]:
    ffi, lib = build_c("pio_floor", FLOOR.read_text(),
                       "long pio_floor(int vcpu_fd, void *run_page);\n"
                       "long pio_dispatch(int vcpu_fd, void *run_page, int (*on_out)(int, int, unsigned));")
    run_kvmkit(min(exits, 1000))                     # warm up both
    run_floor(min(exits, 1000), lib, ffi)
    run_dispatch(min(exits, 1000), lib, ffi)
    k, c, d = [], [], []
    for _ in range(runs):                            # interleaved: each sees the same load
        k.append(run_kvmkit(exits))
        c.append(run_floor(exits, lib, ffi))
        d.append(run_dispatch(exits, lib, ffi))
    g = "port-I/O exit"
    note = f"{exits} exits per run, 64-bit guest, out 0x10"
    return [
        Figure(g, "kvmkit's vCPU loop, wall per exit", "µs", [r["wall_us"] for r in k], "C floor (bench/pio_floor.c)", c,
               note=note),
        Figure(g, "kvmkit minus C floor, wall per exit", "µs",
               [r["wall_us"] - f for r, f in zip(k, c)]),
        Figure(g, "C run loop calling the Python bus per exit (a C dispatch helper), wall per exit", "µs",
               d, "C floor (bench/pio_floor.c)", c),
        Figure(g, "handle_exit replayed without KVM", "µs", [r["replay_us"] for r in k], diagnostic=True),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exits", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from machine_info import describe
    print(describe())
    print()
    print(table(measure(args.exits, args.runs)))


if __name__ == "__main__":
    main()
