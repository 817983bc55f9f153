"""Fakes for driving a device without a VM (re-exported by :mod:`kvmkit.testing`):
:class:`FakeContext` (a DeviceContext that records what the device registers),
:class:`FakeIrqLine`, register access as a vCPU does (:func:`pio`,
:func:`mmio`), :func:`config` and :func:`plugin_manager`.

The bottom of the test helpers: the contract (:mod:`kvmkit.contract`) and the
pytest plugin (:mod:`kvmkit.pytest_plugin`) import this module, never the
other way round.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping

import pluggy

from . import hookspecs
from .memory import GuestMemory
from .plugin_api import MMIO, PIO, PROJECT, DeviceConfig, DeviceError

__all__ = ["FakeIrqLine", "FakeContext", "pio", "mmio", "config", "plugin_manager"]


class FakeIrqLine:
    """An interrupt line that records what the device did with it.

    ``history`` holds ``True``/``False`` for every ``set_level`` call and the
    string ``"pulse"`` for every ``pulse``; ``level`` is the current level.
    """

    def __init__(self, gsi: int):
        self.gsi = gsi
        self.level = False
        self.history: list[bool | str] = []

    def set_level(self, high: bool) -> None:
        self.level = bool(high)
        self.history.append(self.level)

    def pulse(self) -> None:
        self.history.append("pulse")

    @property
    def rising_edges(self) -> int:
        """How many times the line went from low to high (pulses count too)."""
        edges, level = 0, False
        for event in self.history:
            if event == "pulse":
                edges += 0 if level else 1
            else:
                edges += 1 if event and not level else 0
                level = event
        return edges

    def clear_history(self) -> None:
        self.history.clear()


class FakeContext:
    """A :class:`kvmkit.plugin_api.DeviceContext` for tests.

    ``io`` maps ``"pio"``/``"mmio"`` to the ``(base, size, handler)`` ranges the
    device registered; ``irqs`` maps GSIs to :class:`FakeIrqLine`;
    ``stop_requests`` lists the ``(reason, exit_code)`` of ``request_stop``
    calls; ``virtio`` lists the models handed to ``add_virtio`` and
    ``queue_backends`` their queue backends (each model gets its backend as
    ``queue_backend`` and an :class:`EngineHost` as ``host``, as the VMM's
    runtime gives them, so a native engine starts when the model asks).  With
    ``buses`` (``{"pio": Bus, "mmio": Bus}``, real :class:`kvmkit.bus.Bus`
    objects) every range also goes on its bus, so tests can reach the device
    exactly as a vCPU does; ``memory`` replaces the 1 MiB of zeroed RAM.  ``close()``
    sets ``stopping``, joins the device's threads and raises if one is still
    running or died with an exception.
    """

    def __init__(self, name: str = "test.0", *, machine_name: str = "test",
                 memory_size: int = 1 << 20, join_timeout: float = 5.0,
                 memory: GuestMemory | None = None, buses: Mapping[str, Any] | None = None):
        self.name = name
        self.machine_name = machine_name
        self.memory = memory if memory is not None else GuestMemory(
            memory_size, backing=bytearray(memory_size))
        self.buses = dict(buses or {})
        self.lock = threading.RLock()
        self.log = logging.getLogger(f"kvmkit.test.{name}")
        self.io: dict[str, list[tuple[int, int, Any]]] = {PIO: [], MMIO: []}
        self.irqs: dict[int, FakeIrqLine] = {}
        self.stop_requests: list[tuple[str, int]] = []
        self.virtio: list[Any] = []
        self.queue_backends: list[Any] = []                # per model in ``virtio``
        self.hosts: list[Any] = []                         # EngineHost per model
        self.pci: list[tuple[Any, dict]] = []              # (ConfigSpace, {bar: handler})
        self.shutdown_handlers: list[Callable[[], None]] = []
        self.threads: list[threading.Thread] = []
        self.thread_errors: list[BaseException] = []
        self._stopping = threading.Event()
        self._join_timeout = join_timeout

    # -- the DeviceContext protocol -----------------------------------------------------
    def add_io(self, space: str, base: int, size: int, handler) -> None:
        if space not in self.io:
            raise DeviceError(f"{self.name}: unknown address space {space!r}")
        if size <= 0 or base < 0:
            raise DeviceError(f"{self.name}: bad {space} range {base:#x}+{size:#x}")
        for other, other_size, _ in self.io[space]:
            if base < other + other_size and other < base + size:
                raise DeviceError(f"{self.name}: {space} range {base:#x}+{size:#x} overlaps "
                                  f"{other:#x}+{other_size:#x}")
        bus = self.buses.get(space)
        if bus is not None:
            bus.add(base, size, handler, self.lock, self.name)
        self.io[space].append((base, size, handler))

    def add_virtio(self, device, queue: str = "auto") -> None:
        """Record a virtio device model (the real context puts it on a
        virtio-pci function); ``queue`` must name an installed backend."""
        from .virtio.backends import BackendError, resolve
        from .virtio.engine_host import EngineHost
        try:
            backend = resolve(queue, self.name)
        except BackendError as e:
            raise DeviceError(str(e)) from None
        host = EngineHost()
        device.queue_backend, device.host = backend, host
        self.virtio.append(device)
        self.queue_backends.append(backend)
        self.hosts.append(host)

    def add_pci(self, config, bars) -> int:
        """Record a plain PCI function; returns its (made-up) device number."""
        self.pci.append((config, dict(bars)))
        return len(self.pci)

    def on_shutdown_request(self, callback: Callable[[], None]) -> None:
        self.shutdown_handlers.append(callback)

    def request_shutdown(self) -> None:
        """Play the control socket's graceful stop (with the device lock)."""
        for callback in self.shutdown_handlers:
            with self.lock:
                callback()

    def irq(self, gsi: int) -> FakeIrqLine:
        if not 0 <= gsi < 24:
            raise DeviceError(f"IRQ {gsi} does not exist (the IOAPIC has inputs 0-23)")
        return self.irqs.setdefault(gsi, FakeIrqLine(gsi))

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        def run() -> None:
            try:
                target()
            except BaseException as e:          # surfaced by close()
                self.thread_errors.append(e)

        t = threading.Thread(target=run, name=f"{self.name}:{name}", daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        self.stop_requests.append((reason, exit_code))
        self._stopping.set()

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    # -- test side -----------------------------------------------------------------------
    def find(self, space: str, address: int) -> tuple[int, int, Any]:
        """The registered ``(base, size, handler)`` that holds ``address``."""
        for base, size, handler in self.io[space]:
            if base <= address < base + size:
                return base, size, handler
        raise LookupError(f"no {space} range holds {address:#x}")

    def close(self) -> None:
        self._stopping.set()
        for host in self.hosts:
            if not host.engines:                   # an engine still running keeps its fds
                host.close()
        self.hosts = [h for h in self.hosts if h.engines]
        for t in self.threads:
            t.join(self._join_timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise RuntimeError(f"device threads still running after stop: {', '.join(alive)}")
        if self.thread_errors:
            raise RuntimeError("a device thread failed") from self.thread_errors[0]

    def __enter__(self) -> "FakeContext":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _access(ctx: FakeContext, space: str, address: int, size: int, value: int | None):
    base, length, handler = ctx.find(space, address)
    if address + size > base + length:
        raise LookupError(f"{space} access {address:#x}+{size} crosses the end of its range")
    with ctx.lock:
        if value is None:
            return handler.read(address - base, size)
        handler.write(address - base, size, value)
        return None


def pio(ctx: FakeContext, port: int, size: int = 1, value: int | None = None) -> int | None:
    """Read ``port`` (``value`` None) or write ``value`` to it, as a vCPU would:
    the handler that claims ``port`` is called with the offset into its range,
    under ``ctx.lock``."""
    return _access(ctx, PIO, port, size, value)


def mmio(ctx: FakeContext, address: int, size: int = 4, value: int | None = None) -> int | None:
    """Like :func:`pio` for the MMIO bus."""
    return _access(ctx, MMIO, address, size, value)


def config(spec, **values) -> DeviceConfig:
    """A :class:`DeviceConfig` for ``spec`` with ``values`` over the defaults
    (no type checks: the core's validation is not under test here)."""
    known = {k.name: k for k in spec.keys}
    for name in values:
        if name not in known:
            raise KeyError(f"{spec.kind} has no key {name!r}")
    missing = [k.name for k in spec.keys if k.required and k.name not in values]
    if missing:
        raise KeyError(f"{spec.kind}: required keys missing: {', '.join(missing)}")
    filled = {k.name: values.get(k.name, k.default) for k in spec.keys}
    return DeviceConfig(spec.kind, filled, f"test ({spec.kind})")


def plugin_manager(*plugins) -> pluggy.PluginManager:
    """A plugin manager with kvmkit's hook specs and ``plugins`` registered,
    checked the way the core checks them (a hookimpl without a spec fails)."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    for plugin in plugins:
        pm.register(plugin)
    pm.check_pending()
    return pm
