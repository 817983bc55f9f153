"""Assemble a VM from a validated machine configuration and run it.

This is the one place that sees the whole machine: KVM, guest memory, the
buses, the devices the plugins create, the boot image and the vCPU threads.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
import types

from . import chipset, endings
from .acpi import aml, dsdt as acpi_dsdt, firmware as acpi_firmware, platform as acpi_platform
from .boot import BootError, load_linux, layout as boot_layout
from .bus import Bus, BusConflict
from .config import MachineConfig
from .hypervisor import cpu_setup, host_quirks
from .hypervisor.kvm import Kvm
from .device_context import DeviceContext
from .irq import Gsi, GsiRouter, IrqLine, line as irq_line
from .memory import GuestMemory
from .pci import IoAllocator, MmioAllocator, PciHost
from .pci_mapping import intx_gsi
from .plugin_api import MMIO, PIO, DeviceError
from .plugins import PluginError, new_manager
from .preflight import check_machine
from .vcpu import EXIT_ERROR, EXIT_NAMES, Stop, VcpuThread

log = logging.getLogger("kvmkit.machine")

TSS_ADDR = 0xFFFB_D000               # three pages KVM needs on Intel, in the hole below 4 GiB
IDENTITY_MAP_ADDR = 0xFFFB_C000
ACPI_GED_GSI = 10                    # the power button's interrupt (edge, active high; ISA IRQ 10 is free; 9 is the SCI)


PAUSE_TIMEOUT = 5.0                  # seconds pause/resume/graceful stop wait for a thread or lock


class MachineError(Exception):
    """The machine cannot be built as configured (one line, says what to fix)."""


class PauseError(Exception):
    """pause or resume did not complete in time (the message says what hung);
    the VM is left running."""


class Machine:
    def __init__(self, config: MachineConfig, pm=None, checked=None):
        """``checked``: what ``check_machine(config, pm)`` returned, if the
        caller ran it already (with ``pm``)."""
        self.config = config
        self.pm = pm or new_manager()
        self._checked = checked
        self.checked = None                     # what check_machine found (plugins, devices)
        self.restored_from = None               # the Snapshot this machine was restored from
        self.stopping = threading.Event()
        self.stop: Stop | None = None
        self._stop_lock = threading.Lock()
        self._gsis: dict[int, Gsi] = {}
        self.kvm = self.vm = self.memory = None
        self.pio = Bus(PIO, self._miss)
        self.mmio = Bus(MMIO, self._miss)
        self.devices: list[tuple[DeviceContext, object]] = []
        self.virtio: list = []                # VirtioPciRuntime per virtio device
        self.pci = PciHost()
        self.acpi = None                      # AcpiPlatform when the machine has ACPI
        self.mmio_alloc = MmioAllocator()
        self.io_alloc = IoAllocator()
        self.router = None
        self.vcpus: list = []
        self.threads: list[VcpuThread] = []
        self.quirks = False
        self.cmdline = ""
        self.started_at = 0.0
        self.shutdown_handlers: list = []       # (ctx, callback): graceful stop paths
        self.running = threading.Event()        # cleared while paused
        self.running.set()
        self.watchdog: endings.Watchdog | None = None
        self._final_vcpu_exits: list[dict] | None = None    # taken when the vCPU threads end
        self._reset_page = None                 # the page mapped at the reset vector
        self._pause_lock = threading.Lock()
        self._pauser: threading.Thread | None = None
        self._pause_waits_for = ""              # the device whose lock the pause thread awaits

    # -- plumbing for devices --------------------------------------------------------
    def _miss(self, space, address, size, is_write, value):
        return self.pm.hook.kvmkit_unhandled_io(space=space, address=address, size=size,
                                                is_write=is_write, value=value)

    def irq(self, gsi: int) -> IrqLine:
        return irq_line(self._gsis, self.vm, gsi)

    def request_stop(self, reason: str, code: int = 0) -> None:
        with self._stop_lock:
            if self.stop is None:
                self.stop = Stop(reason, code)
                log.info("stopping: %s", reason)
            self.stopping.set()
        self.running.set()                     # a paused machine stops too
        for t in self.threads:
            t.kick()

    # -- pause, resume, graceful stop ----------------------------------------------------
    @property
    def paused(self) -> bool:
        return not self.running.is_set()

    def pause(self, timeout: float = PAUSE_TIMEOUT) -> None:
        """Stop every vCPU (outside KVM_RUN) and every device thread: a thread
        of this machine holds every device lock until resume().

        vCPUs park first (a parked vCPU holds no device lock), then the pause
        thread takes the device locks, always in the same order.  Each step
        has a deadline: PauseError says what did not stop, and the VM runs on."""
        with self._pause_lock:
            if self.paused or self.stopping.is_set():
                return
            if self._pauser is not None and self._pauser.is_alive():
                raise PauseError("the previous pause is still letting go of the devices "
                                 f"({self._pause_waits_for or 'pause thread'}); try again")
            deadline = time.monotonic() + timeout
            self.running.clear()
            for t in self.threads:
                t.kick()
            stuck = [t.name for t in self.threads
                     if t.is_alive() and not t.parked.wait(max(0.0, deadline - time.monotonic()))]
            if stuck:
                self.running.set()
                raise PauseError(f"pause failed: {', '.join(stuck)} did not stop within "
                                 f"{timeout:g} s (busy in a device?); the VM keeps running")
            held = threading.Event()
            self._pauser = threading.Thread(target=self._hold_devices, args=(held,),
                                            name="pause", daemon=True)
            self._pauser.start()
            if not held.wait(max(0.0, deadline - time.monotonic())):
                waits_for = self._pause_waits_for
                self.running.set()            # the pause thread lets go once it has them
                raise PauseError(f"pause failed: device {waits_for} did not let go of its lock "
                                 f"within {timeout:g} s; the VM keeps running")
            log.info("paused")

    def _hold_devices(self, held: threading.Event) -> None:
        locks = [(getattr(ctx, "name", "?"), ctx.lock) for ctx, _device in self.devices]
        for name, lock in locks:
            self._pause_waits_for = name
            lock.acquire()
        self._pause_waits_for = ""
        locks = [lock for _name, lock in locks]
        # Threads that never take a device lock (C queue engines) pause here.
        pausables = [p for ctx, _device in self.devices for p in getattr(ctx, "pausables", ())]
        for p in pausables:
            p.pause()
        held.set()
        self.running.wait()                    # resume() or a stop
        for p in reversed(pausables):
            p.resume()
        for lock in reversed(locks):
            lock.release()

    def resume(self, timeout: float = PAUSE_TIMEOUT) -> None:
        with self._pause_lock:
            if not self.paused:
                return
            self.running.set()
            if self._pauser is not None:
                self._pauser.join(timeout=timeout)
                if self._pauser.is_alive():
                    raise PauseError(f"resume: the devices were not let go within {timeout:g} s "
                                     "(a device's resume hangs); the vCPUs run")
            log.info("resumed")

    def request_guest_shutdown(self) -> bool:
        """Ask the guest to shut down by itself; False if no device can.

        Handlers are tried in order; one that returns False (it cannot reach
        the guest now, e.g. the ACPI power button of a guest without ACPI)
        passes the request on to the next."""
        for ctx, callback in self.shutdown_handlers:
            if not ctx.lock.acquire(timeout=PAUSE_TIMEOUT):
                log.warning("%s is busy (its lock was not free within %g s); it cannot ask the "
                            "guest to shut down", getattr(ctx, "name", "a device"), PAUSE_TIMEOUT)
                continue
            try:
                if callback() is False:
                    continue
            finally:
                ctx.lock.release()
            return True
        return False

    def status(self) -> dict:
        counts = self.exit_counts()
        return {
            "name": self.config.name,
            "state": "stopping" if self.stopping.is_set() else "paused" if self.paused else "running",
            "vcpus": self.config.vcpus,
            "memory": self.config.memory,
            "devices": [ctx.name for ctx, _device in self.devices],
            "uptime": round(time.monotonic() - self.started_at, 3) if self.started_at else 0.0,
            "exits": {EXIT_NAMES.get(k, str(k)): v for k, v in sorted(counts.items())},
            "exits_total": sum(counts.values()),
            "vcpu_exits": self.vcpu_exits(),
            "cmdline": self.cmdline,
            "virtqueues": self.queue_backends(),
        }

    def queue_backends(self) -> dict[str, str]:
        """Each virtio device's queue backend: ``{"virtio-blk.0": "native"}``."""
        return {rt.ctx.name: rt.backend.name for rt in self.virtio}

    # -- building ----------------------------------------------------------------------
    def build(self, snapshot=None) -> None:
        """Build the machine to boot its kernel, or, given ``snapshot`` (a
        snapshot_format.Snapshot of this configuration), to go on from it:
        its memory, vCPU, platform and device state, nothing loaded."""
        cfg = self.config
        checked = self._checked or check_machine(cfg, self.pm)    # what `kvmkit check` checks
        self.checked = checked
        self.build_platform(snapshot.memory_path if snapshot is not None else None)
        if snapshot is not None:
            from . import snapshot as snapshots
            try:
                snapshots.check_host(self, snapshot)
            except snapshots.SnapshotError as e:
                raise MachineError(str(e)) from None

        counts: dict[str, int] = {}
        for table, dcfg in zip(cfg.devices, checked.devices):
            index = counts.get(table.kind, 0)
            counts[table.kind] = index + 1
            ctx = DeviceContext(self, f"{table.kind}.{index}")
            try:
                device = self.pm.hook.kvmkit_create_device(kind=table.kind, config=dcfg, ctx=ctx)
            except (DeviceError, BusConflict) as e:
                raise MachineError(f"{table.where}: {e}") from None
            except Exception as e:                  # a plugin bug: name the plugin, keep the details
                log.debug("creating %s failed", ctx.name, exc_info=True)
                raise MachineError(f"{table.where}: the {table.kind!r} plugin failed to create the "
                                   f"device: {type(e).__name__}: {e} (--debug shows where)") from e
            if device is None:
                raise PluginError(f"{table.where}: the plugin for kind {table.kind!r} created no device")
            self.devices.append((ctx, device))

        self.quirks = host_quirks.resolve(cfg.host_quirks)
        if snapshot is not None:
            self._restore(snapshot)
            return
        self.cmdline = self._cmdline()
        pci_irqs = [(slot, pin, intx_gsi(slot)) for slot, pin in self.pci.interrupt_pins()]
        rsdp_addr = self._install_acpi(pci_irqs) if cfg.acpi else 0
        try:
            boot = load_linux(self.memory, cfg.kernel.image, cfg.kernel.initrd, self.cmdline, cfg.vcpus,
                              acpi_rsdp_addr=rsdp_addr, pci_irqs=pci_irqs,
                              kernel_data=checked.kernel_data)
        except BootError as e:
            raise MachineError(str(e)) from None
        supported = self.kvm.supported_cpuid()
        for i in range(cfg.vcpus):
            vcpu = self.add_vcpu(i)
            cpu_setup.setup_vcpu(vcpu, supported, cfg.vcpus, boot)

    def _restore(self, snapshot) -> None:
        """The rest of build() for a restored machine: wire what the guest
        already set up (ACPI registers, power button), add the vCPUs, put the
        saved state back."""
        from . import snapshot as snapshots
        self.restored_from = snapshot
        self.cmdline = snapshot.manifest.get("cmdline", "")
        if self.config.acpi:
            self._wire_acpi()
        for i in range(self.config.vcpus):
            self.add_vcpu(i)
        try:
            snapshots.restore(self, snapshot)
        except (snapshots.SnapshotError, ValueError) as e:   # ValueError: device/vCPU StateError
            raise MachineError(f"{snapshot.path}: cannot restore: {e}") from None

    def build_platform(self, memory_file=None) -> None:
        """KVM, guest RAM, the interrupt controllers, the PCI host and the
        chipset's reset control and reset vector: the machine before any
        device or kernel (tests of hand-made guests stop here).
        ``memory_file``: a snapshot's memory, mapped copy-on-write as guest
        RAM (it holds the reset vector already)."""
        self.kvm = Kvm()
        self.vm = self.kvm.create_vm()
        try:
            if memory_file is not None:
                self.memory = GuestMemory.from_file(memory_file, self.config.memory)
            else:
                self.memory = GuestMemory(self.config.memory)
        except ValueError as e:
            raise MachineError(str(e)) from None
        except OSError as e:
            if memory_file is not None:
                raise MachineError(f"{memory_file}: cannot map the snapshot's memory: "
                                   f"{e.strerror or e}") from None
            raise MachineError(f"cannot allocate {self.config.memory >> 20} MiB of guest memory: "
                               f"{e.strerror or e}; give less ([machine] memory, --memory)") from None
        self.vm.map_memory(self.memory)
        self.vm.set_identity_map_addr(IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()
        self.router = GsiRouter(self.vm)
        pci_lock = threading.RLock()
        self.pci.reset_control = chipset.ResetControl(self.request_stop)
        for base, size, handler in self.pci.pio_ranges():
            self.pio.add(base, size, handler, pci_lock, "pci-host")
        if memory_file is None:
            chipset.install_reset_vector(self.memory)
        self._reset_page = chipset.reset_page()
        self.vm.map_extra(len(self.memory.regions), chipset.RESET_PAGE, self._reset_page)

    def add_vcpu(self, index: int):
        """Create vCPU ``index``; its exits carry its registers when KVM can (endings.py)."""
        vcpu = self.vm.create_vcpu(index)
        self.vcpus.append(vcpu)
        vcpu.enable_sync_regs()
        return vcpu

    # -- ACPI ----------------------------------------------------------------------------
    def _acpi_nodes(self) -> list[bytes]:
        """AML from each device that describes itself (``device.acpi_node(aml)``)."""
        nodes = []
        for ctx, device in self.devices:
            describe = getattr(device, "acpi_node", None)
            if describe is None:
                continue
            try:
                node = describe(aml)
            except Exception as e:
                raise MachineError(f"{ctx.name}: its ACPI node failed: {type(e).__name__}: {e}") from e
            if not isinstance(node, (bytes, bytearray)):
                raise MachineError(f"{ctx.name}: acpi_node() returned {type(node).__name__}, not AML bytes")
            nodes.append(bytes(node))
        return nodes

    def _wire_acpi(self) -> None:
        """The ACPI platform registers and the power button (what the tables point at)."""
        lock = threading.RLock()
        self.acpi = acpi_platform.AcpiPlatform(self.request_stop)
        self.pio.add(acpi_platform.BASE, acpi_platform.SIZE, self.acpi, lock, "acpi")
        ged = self.irq(ACPI_GED_GSI)
        platform = self.acpi

        def press_power_button():
            if not platform.ospm_ready:
                return False                   # no ACPI in the guest: let the next handler try
            log.info("pressing the ACPI power button")
            ged.pulse()
            return True

        # Tried before every device's handler (the i8042's Ctrl-Alt-Del).
        self.shutdown_handlers.insert(0, (types.SimpleNamespace(lock=lock), press_power_button))

    def _install_acpi(self, pci_irqs) -> int:
        """Write the ACPI tables, wire their registers and the power button; the RSDP's address."""
        self._wire_acpi()
        ram_top = max(r.gpa + r.size for r in self.memory.regions)
        pci = acpi_dsdt.PciLayout(io_windows=((0, 0xCF7), (0xD00, 0xFFFF)),
                                  mmio32=(self.mmio_alloc.start, self.mmio_alloc.end - 1),
                                  mmio64=acpi_dsdt.high_window(ram_top), intx=tuple(pci_irqs))
        try:
            t = acpi_firmware.build(boot_layout.BIOS_START, chipset.REAL_MODE_VECTOR,
                                    vcpus=self.config.vcpus, lapic_addr=boot_layout.LAPIC_ADDR,
                                    ioapic_addr=boot_layout.IOAPIC_ADDR, pci=pci,
                                    power=acpi_platform.registers(), ged_gsi=ACPI_GED_GSI,
                                    ospm_port=acpi_platform.BASE + acpi_platform.OSPM,
                                    device_nodes=self._acpi_nodes())
        except acpi_firmware.AcpiLayoutError as e:
            raise MachineError(f"{e}; set acpi = false in [machine] or describe fewer devices") from None
        self.memory.write(t.base, t.blob)
        log.debug("ACPI tables at %#x-%#x, RSDP at %#x", t.base, t.base + len(t.blob), t.rsdp_addr)
        return t.rsdp_addr

    def _cmdline(self) -> str:
        words = self.config.kernel.cmdline.split()
        for extra in self.pm.hook.kvmkit_kernel_cmdline(machine=self.config):
            for word in (extra or "").split():
                key = word.split("=", 1)[0]
                if not any(w.split("=", 1)[0] == key for w in words):
                    words.append(word)
        cmdline = " ".join(words)
        return host_quirks.extend_cmdline(cmdline, self.vm.tsc_khz()) if self.quirks else cmdline

    # -- running -----------------------------------------------------------------------
    def run(self) -> Stop:
        """Run until the guest or the user stops the machine; return why."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGUSR1, lambda *_: None)     # only to interrupt KVM_RUN
        self.started_at = time.monotonic()
        for rt in self.virtio:
            rt.start()
        for _ctx, device in self.devices:
            start = getattr(device, "start", None)
            if start is not None:
                start()
        self.pm.hook.kvmkit_vm_started(vm=self)
        self.threads = [VcpuThread(v, self) for v in self.vcpus]
        for t in self.threads:
            t.start()
        # Endings the guest does not announce (all halted, a stall): decided here.
        self.watchdog = endings.Watchdog(self.threads, self.config.stall_timeout)
        while not self.stopping.wait(0.2):
            stop = self.watchdog.tick(paused=self.paused)
            if stop is not None:
                self.request_stop(stop.reason, stop.code)
        for t in self.threads:
            t.kick()
            t.join(timeout=5)
        self._final_vcpu_exits = self.vcpu_exits()
        stop = self.stop or Stop("stopped", EXIT_ERROR)
        self.pm.hook.kvmkit_vm_stopped(vm=self, reason=stop.reason, exit_code=stop.code)
        return stop

    def vcpu_exits(self) -> list[dict]:
        """Per vCPU: its exit count, its last exit and that exit's RIP (kvmkit status, the summary)."""
        if self._final_vcpu_exits is not None:
            return self._final_vcpu_exits
        return [endings.vcpu_status(t) for t in self.threads]

    def exit_counts(self) -> dict[int, int]:
        total: dict[int, int] = {}
        for t in self.threads:
            for k, v in t.exits.items():
                total[k] = total.get(k, 0) + v
        return total

    def close(self) -> None:
        """Release everything; safe after a partial build."""
        self.stopping.set()
        for rt in self.virtio:                  # queue workers first, then the devices' files
            try:
                rt.close()
            except Exception:
                log.exception("closing %s failed", rt.ctx.name)
        for ctx, device in reversed(self.devices):
            close = getattr(device, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    log.exception("closing %s failed", ctx.name)
        for ctx, _device in self.devices:
            for t in ctx.threads:
                t.join(timeout=2)
        alive = [t for t in self.threads if t.is_alive()]
        if alive:                      # a vCPU stuck in the kernel: leave its fds to exit
            log.warning("%d vCPU thread(s) did not stop; leaving them to process exit", len(alive))
            return
        for v in self.vcpus:
            v.close()
        if self.vm is not None:
            self.vm.close()
        if self._reset_page is not None:
            try:
                self._reset_page.close()
            except BufferError:
                pass
        if self.kvm is not None:
            self.kvm.close()
        if self.memory is not None:
            try:
                self.memory.close()
            except BufferError:
                pass

