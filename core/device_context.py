"""What the core hands a device when it creates it (see plugin_api.DeviceContext)."""
from __future__ import annotations

import logging
import threading

from .plugin_api import EXIT_ERROR, MMIO, PIO, DeviceError


class DeviceContext:
    """What a device gets from the core (see kvmkit.plugin_api.DeviceContext)."""

    def __init__(self, machine, name: str):
        self._machine = machine
        self.name = name
        self.machine_name = machine.config.name
        self.memory = machine.memory
        self.lock = threading.RLock()
        self.log = logging.getLogger(f"kvmkit.device.{name}")
        self.threads: list[threading.Thread] = []
        self.pausables: list = []        # objects with pause()/resume(), called while the VM pauses
        self.virtio_runtimes: list = []  # VirtioPciRuntime per add_virtio (kvmkit.device_state)
        self.pci_functions: list = []    # (ConfigSpace, BarMapper) per add_pci (kvmkit.device_state)

    def add_io(self, space: str, base: int, size: int, handler) -> None:
        bus = {PIO: self._machine.pio, MMIO: self._machine.mmio}.get(space)
        if bus is None:
            raise DeviceError(f"{self.name}: unknown address space {space!r} (use 'pio' or 'mmio')")
        bus.add(base, size, handler, self.lock, self.name)

    def irq(self, gsi: int):
        return self._machine.irq(gsi)

    def add_virtio(self, device, queue: str = "auto"):
        """Put a virtio device model behind the virtio-pci transport, its queues
        run by the queue backend ``queue`` names."""
        from .virtio.backends import BackendError, resolve
        from .virtio.runtime import VirtioPciRuntime
        try:
            backend = resolve(queue, self.name)
        except BackendError as e:
            raise DeviceError(str(e)) from None
        runtime = VirtioPciRuntime(self._machine, self, device, backend)
        self._machine.virtio.append(runtime)
        self.pausables.append(runtime)
        self.virtio_runtimes.append(runtime)
        return runtime

    def add_pci(self, config, bars) -> int:
        """Put a plain PCI function on bus 0 (see plugin_api.DeviceContext.add_pci)."""
        from .pci_mapping import add_function
        slot, mapper = add_function(self._machine, self, config, bars)
        self.pci_functions.append((config, mapper))
        return slot

    def on_shutdown_request(self, callback) -> None:
        self._machine.shutdown_handlers.append((self, callback))

    def spawn(self, name: str, target) -> threading.Thread:
        """Run ``target`` on a thread of this device; if it raises, the VM
        stops with status 1 naming the device (as a raising model does)."""
        def run() -> None:
            try:
                target()
            except BaseException as e:
                self.log.debug("thread %s died", name, exc_info=True)
                self._machine.request_stop(f"device {self.name} failed: its {name} thread died: "
                                           f"{type(e).__name__}: {e} (--debug shows where)",
                                           EXIT_ERROR)

        t = threading.Thread(target=run, name=f"{self.name}:{name}", daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        self._machine.request_stop(reason, exit_code)

    @property
    def stopping(self) -> threading.Event:
        return self._machine.stopping
