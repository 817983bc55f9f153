"""The one module device plugins import.

A device plugin is an object named by an entry point in the group
``kvmkit.devices`` (the entry-point name is the machine file's ``kind``) that
implements the hooks ``kvmkit_device_spec`` and ``kvmkit_create_device``.
For the usual case of one kind, :class:`DevicePlugin` implements both:

.. code-block:: python

    from kvmkit.plugin_api import DevicePlugin, DeviceSpec, Key

    SPEC = DeviceSpec(kind="rtc", summary="MC146818 CMOS clock",
                      keys=(Key("port", int, 0x70, "first I/O port"),))

    plugin = DevicePlugin(SPEC, MyDevice)   # MyDevice(config, ctx) registers its ranges

    # pyproject.toml: [project.entry-points."kvmkit.devices"]
    #                 rtc = "kvmkit_rtc.plugin:plugin"

A module with ``@hookimpl`` functions works as well, for plugins that
provide several kinds or implement more hooks.

The core validates every ``[[device]]`` table against ``SPEC.keys`` before
``kvmkit_create_device`` is called, so ``config`` holds typed values with the
defaults filled in (``config.port``, ``config["port"]``).

Devices are reached from vCPU threads (through the buses) and from their own
threads (started with ``ctx.spawn``).  The core holds ``ctx.lock`` around every
bus access to the device; a device's own threads take ``ctx.lock`` before they
touch device state, so device code stays single-threaded.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol, runtime_checkable

import pluggy

if TYPE_CHECKING:                      # resolved lazily at run time, see __getattr__ below
    from .pci.config_space import ConfigSpace
    from .virtio.device import VirtioDevice
    from .virtio.queue import Chain, SplitQueue, VirtqueueError


PROJECT = "kvmkit"
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "hookimpl", "Key", "DeviceSpec", "DevicePlugin", "DeviceConfig", "Size", "REQUIRED",
    "IoHandler", "IrqLine", "GuestMemory", "GuestMemoryError", "DeviceContext",
    "DeviceError", "PIO", "MMIO", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_FORCED",
    "EXIT_GUEST_PANIC", "EXIT_GUEST_HALTED", "EXIT_STALLED", "ConfigSpace", "VirtioDevice",
    "SplitQueue", "Chain", "VirtqueueError", "QUEUE_KEY", "GuestLog", "listen_unix_socket",
    "Acceptor", "StateUnsupported",
]

PIO = "pio"
MMIO = "mmio"

# kvmkit's exit statuses (README: "Exit status").  Devices pass these to
# ctx.request_stop().
EXIT_OK = 0            # guest reset, power-off or triple fault; the user quit
EXIT_ERROR = 1         # a VMM error: KVM, a device, an instruction KVM cannot emulate
EXIT_USAGE = 2         # bad input: machine file, flags, plugins, kernel files
EXIT_FORCED = 3        # stopped by force: `kvmkit kill`, or a graceful stop that timed out
EXIT_GUEST_PANIC = 4   # the guest kernel reported a panic (pvpanic)
EXIT_GUEST_HALTED = 5  # every vCPU halted for good (interrupts off): `halt -f`, a stopped kernel
EXIT_STALLED = 6       # no vCPU exited for [machine] stall_timeout seconds


class DeviceError(Exception):
    """A device cannot be set up as configured (the message says what to fix)."""


class GuestMemoryError(Exception):
    """A guest-physical range is not inside guest RAM."""


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


class Size(int):
    """A byte count written as an int or a string with a K/M/G/T suffix ("256M")."""

    _UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

    @classmethod
    def parse(cls, value: Any) -> "Size":
        if isinstance(value, bool):
            raise ValueError("expected a size such as 256M")
        if isinstance(value, int):
            if value < 0:
                raise ValueError("a size cannot be negative")
            return cls(value)
        if not isinstance(value, str):
            raise ValueError("expected a size such as 256M")
        text = value.strip().upper()
        if text.endswith("IB"):
            text = text[:-2]
        elif text.endswith("B"):
            text = text[:-1]
        unit = text[-1:] if text[-1:] in cls._UNITS and text[-1:] else ""
        number = text[: len(text) - len(unit)].strip()
        try:
            return cls(int(number, 0) * cls._UNITS[unit])
        except ValueError:
            raise ValueError(f"{value!r} is not a size such as 256M or 2G") from None


@dataclasses.dataclass(frozen=True)
class Key:
    """One machine-file key of a device kind.

    ``type`` is one of ``int``, ``bool``, ``str``, ``float``, ``Path`` (resolved
    relative to the machine file), ``Size`` or ``list`` (of strings).  A key
    without ``default`` is required; ``default=None`` makes it optional with no
    value (the device decides what its absence means, and says so in ``doc``).
    """

    name: str
    type: type
    default: Any = REQUIRED
    doc: str = ""
    choices: tuple | None = None
    min: int | None = None
    max: int | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    @property
    def type_name(self) -> str:
        return {int: "int", bool: "bool", str: "string", float: "float", Path: "path",
                Size: "size", list: "list of strings"}.get(self.type, self.type.__name__)


# The key every virtio device kind takes: which queue backend runs its
# virtqueues (entry-point group ``kvmkit.queues``).  Pass its value on:
# ``ctx.add_virtio(model, queue=config["queue"])``.
QUEUE_KEY_DOC = ('which backend runs the virtqueues: "auto" (native when kvmkit-native is '
                 'installed, else python), "native" (in C; needs kvmkit-native) or "python"')
QUEUE_KEY = Key("queue", str, "auto", QUEUE_KEY_DOC)


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    """What a device kind is called, what it is, and which keys it takes."""

    kind: str
    summary: str
    keys: tuple[Key, ...] = ()

    def key(self, name: str) -> Key | None:
        for k in self.keys:
            if k.name == name:
                return k
        return None


class DeviceConfig(Mapping[str, Any]):
    """A validated ``[[device]]`` table: typed values, defaults filled in."""

    def __init__(self, kind: str, values: Mapping[str, Any], where: str = ""):
        self._kind = kind
        self._values = dict(values)
        self._where = where

    @property
    def kind(self) -> str:
        return self._kind

    @property
    def where(self) -> str:
        """Where the table came from, for error messages ("machine.toml: device[2]")."""
        return self._where

    @property
    def table(self) -> str:
        """The table without the file ("device[2] (rtc)"), to name another device
        of the same machine in a message."""
        return self._where.rsplit(": ", 1)[-1]

    def __getitem__(self, name: str) -> Any:
        return self._values[name]

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"DeviceConfig({self._kind!r}, {self._values!r})"


@runtime_checkable
class IoHandler(Protocol):
    """What a device registers on a bus.  ``offset`` is relative to the range base."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class IrqLine(Protocol):
    """An interrupt input of the in-kernel interrupt controllers (a GSI)."""

    gsi: int

    def set_level(self, high: bool) -> None: ...

    def pulse(self) -> None: ...


class GuestMemory(Protocol):
    """Guest RAM.  Every access is bounds-checked; a range that is not wholly
    inside RAM raises GuestMemoryError and touches nothing."""

    size: int

    def read(self, gpa: int, length: int) -> bytes: ...

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None: ...

    def view(self, gpa: int, length: int) -> memoryview: ...

    def contains(self, gpa: int, length: int) -> bool: ...


class DeviceContext(Protocol):
    """What the core gives a device when it is created."""

    name: str                   # instance name, e.g. "serial8250.0"
    machine_name: str
    memory: GuestMemory
    lock: threading.RLock       # held by the core around every bus access
    log: logging.Logger

    def add_io(self, space: str, base: int, size: int, handler: IoHandler) -> None:
        """Claim ``[base, base+size)`` on the PIO or MMIO bus."""

    def irq(self, gsi: int) -> IrqLine:
        """The interrupt line ``gsi`` (ISA IRQs 0-15 are GSIs 0-15)."""

    def add_virtio(self, device: "VirtioDevice", queue: str = "auto") -> object:
        """Put a :class:`VirtioDevice` model on the PCI bus behind the
        virtio-pci transport; the core runs its queues on a worker thread.
        ``queue`` names the queue backend (the device's ``queue`` key, see
        :data:`QUEUE_KEY`); an unknown or missing one raises DeviceError."""

    def add_pci(self, config: "ConfigSpace", bars: Mapping[int, IoHandler]) -> int:
        """Put a plain PCI function on bus 0: the core assigns its BARs in the
        PCI hole and maps ``bars[i]`` (offsets relative to the BAR) while the
        guest has decoding on.  Returns the device number."""

    def on_shutdown_request(self, callback: Callable[[], None]) -> None:
        """Offer a way to ask the guest to shut down by itself (Ctrl-Alt-Del,
        a power button).  The control socket's graceful stop calls it, with
        this device's lock held."""

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread:
        """Start a daemon thread the core knows of (joined at shutdown); if
        ``target`` raises, the VM stops with status 1 naming the device."""

    def request_stop(self, reason: str, exit_code: int = 0) -> None:
        """Ask the VMM to stop the VM (guest reset, user quit...)."""

    @property
    def stopping(self) -> threading.Event:
        """Set once the VM is stopping; device threads poll or wait on it."""


# Device state for snapshots (docs/hooks.md, "Device state"): a device object
# (or a virtio model) may implement
#
#     def snapshot_state(self) -> dict        # plain data with a "version"; VM paused
#     def restore_state(self, state) -> None  # on a fresh instance, before any vCPU runs
#
# kvmkit.device_state saves the virtio transport, MSI-X, PCI config space and
# queue indices itself.  A device that cannot be saved now raises
# StateUnsupported (re-exported below) from snapshot_state with the reason.


class DevicePlugin:
    """A plugin providing one device kind: its spec, a factory
    ``factory(config, ctx) -> device`` and, optionally, a check
    ``check(config, devices) -> list of problems`` (``kvmkit_check_device``)."""

    def __init__(self, spec: DeviceSpec, factory: Callable[[DeviceConfig, "DeviceContext"], Any],
                 check: Callable[[DeviceConfig, tuple], Any] | None = None):
        self.spec = spec
        self.factory = factory
        self.check = check

    @hookimpl
    def kvmkit_device_spec(self):
        return self.spec

    @hookimpl
    def kvmkit_create_device(self, kind, config, ctx):
        if kind != self.spec.kind:
            return None
        return self.factory(config, ctx)

    @hookimpl
    def kvmkit_check_device(self, kind, config, devices):
        if kind != self.spec.kind or self.check is None:
            return None
        return list(self.check(config, devices) or ())

    def __repr__(self) -> str:
        return f"DevicePlugin({self.spec.kind!r})"


# Re-exported for device plugins, resolved on first use: these modules import
# the core, which imports this module.
_REEXPORTS = {
    "ConfigSpace": "kvmkit.pci.config_space",
    "VirtioDevice": "kvmkit.virtio.device",
    "Chain": "kvmkit.virtio.queue",
    "SplitQueue": "kvmkit.virtio.queue",
    "VirtqueueError": "kvmkit.virtio.queue",
    "GuestLog": "kvmkit.guest_log",        # rate-limited logging of what a guest triggers
    "listen_unix_socket": "kvmkit.host_socket",   # a socket backend's listener
    "Acceptor": "kvmkit.host_socket",             # accept() that survives EMFILE
    "StateUnsupported": "kvmkit.device_state",    # snapshot_state() of a device that cannot
}


def __getattr__(name: str):
    module = _REEXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)
