"""Checking a machine without starting it (``kvmkit check``).

The same steps ``kvmkit run`` takes before it opens ``/dev/kvm``: load the
plugins the machine names, validate every ``[[device]]`` table against its
kind's schema, and look at the kernel and initrd files (present, readable,
a kernel is an x86-64 ELF vmlinux or a bzImage whose header kvmkit can boot).
Devices are not created (that opens disks, sockets and log files), so a
clash between two devices' ports is found only by ``kvmkit run``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .boot import bzimage, elf
from .boot.errors import BootError
from .boot.image import map_file
from .config import ConfigError, MachineConfig, validate_device
from .plugin_api import DeviceConfig
from .virtio.backends import BackendError, resolve as resolve_queue_backend
from .plugins import LoadedKind, load_kinds, new_manager


@dataclasses.dataclass(frozen=True)
class CheckedMachine:
    config: MachineConfig
    kernel_format: str                           # "ELF vmlinux" or "bzImage"
    kernel_data: bytes = dataclasses.field(repr=False)   # the image as checked (mapped): the loader's input
    devices: tuple[DeviceConfig, ...]
    kinds: dict[str, LoadedKind]
    queues: tuple[str | None, ...]               # per device: its queue backend's name, if virtio

    def summary(self) -> str:
        c = self.config
        devices = ", ".join(d.kind + (f" ({q} queues)" if q else "")
                            for d, q in zip(self.devices, self.queues)) or "none"
        return (f"{c.name}: {c.vcpus} vCPU{'s' if c.vcpus != 1 else ''}, "
                f"{format_size(c.memory)} memory, {self.kernel_format} kernel, devices: {devices}")


def format_size(n: int) -> str:
    """256M, 1G, 1536M, 64K: the largest unit that divides ``n``."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return f"{n} bytes"


def check_machine(config: MachineConfig, pm=None) -> CheckedMachine:
    """Raise :class:`ConfigError` or :class:`~kvmkit.plugins.PluginError`
    (one line, naming the file and key) at the first problem.  ``pm``: the
    plugin manager to register the plugins with (``kvmkit run`` passes its own)."""
    loaded = load_kinds(pm or new_manager(), [d.kind for d in config.devices])
    devices = tuple(validate_device(t, loaded[t.kind].spec) for t in config.devices)
    where = str(config.source or "command line")
    kernel = config.kernel
    _check_readable(where, "image", kernel.image)
    if kernel.initrd is not None:
        _check_readable(where, "initrd", kernel.initrd)
        if kernel.initrd.stat().st_size == 0:
            raise ConfigError(f"{where}: [kernel] initrd: {kernel.initrd} is empty")
    try:
        data = map_file(kernel.image)            # the segment checks need the whole file
    except OSError as e:
        raise ConfigError(f"{where}: [kernel] image: cannot read {kernel.image}: {e.strerror}") from None
    fmt = kernel_format(where, kernel.image, data)
    return CheckedMachine(config, fmt, data, devices, loaded, _queue_backends(config, devices))


def _queue_backends(config: MachineConfig, devices) -> tuple[str | None, ...]:
    """Resolve each virtio device's ``queue`` key (a missing backend is an error)."""
    names = []
    for table, device in zip(config.devices, devices):
        if "queue" not in device:
            names.append(None)
            continue
        try:
            names.append(resolve_queue_backend(device["queue"], f"{table.where}: queue").name)
        except BackendError as e:
            raise ConfigError(str(e)) from None
    return tuple(names)


def _check_readable(where: str, key: str, path: Path) -> None:
    if not path.exists():
        raise ConfigError(f"{where}: [kernel] {key}: {path} not found")
    if not path.is_file():
        raise ConfigError(f"{where}: [kernel] {key}: {path} is not a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ConfigError(f"{where}: [kernel] {key}: cannot read {path}: {e.strerror}") from None


def kernel_format(where: str, path: Path, data: bytes) -> str:
    """"ELF vmlinux" or "bzImage" for the image ``data`` read from ``path``,
    after the checks the loader makes on the headers; ConfigError naming the
    file otherwise."""
    try:
        if elf.is_elf(data):
            elf.parse(data, str(path))
            return "ELF vmlinux"
        if bzimage.is_bzimage(data):
            bzimage.parse_header(data, str(path))
            return "bzImage"
    except BootError as e:
        raise ConfigError(f"{where}: [kernel] image: {e}") from None
    raise ConfigError(f"{where}: [kernel] image: {path} is neither an ELF vmlinux nor a bzImage "
                      "(no ELF magic, no boot flag 0xAA55 at 0x1FE)")
