"""Checking a machine without starting it (``kvmkit check``).

The same steps ``kvmkit run`` takes before it opens ``/dev/kvm``: load the
plugins the machine names, validate every ``[[device]]`` table against its
kind's schema, and look at the kernel and initrd files (present, readable,
a kernel is an x86-64 ELF vmlinux or a bzImage whose header kvmkit can boot).
Devices are not created (that opens disks, sockets and log files); instead
each plugin checks its devices' keys and the host resources they need in
``kvmkit_check_device`` (a missing disk image, two consoles on one terminal,
two devices on one port of the same kind).  A clash between the ports of two
different kinds is found only by ``kvmkit run``.  Every problem found is
reported, one line each.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from .boot import bzimage, elf
from .boot.errors import BootError
from .boot.image import map_file
from .config import ConfigError, MachineConfig, Problems, validate_device
from .control import check_socket_name
from .plugin_api import DeviceConfig
from .virtio.backends import BackendError, resolve as resolve_queue_backend
from .plugins import LoadedKind, PluginError, check_devices, installed_kinds, load_kinds, new_manager


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


def check_machine(config: MachineConfig, pm=None, problems: Problems | None = None) -> CheckedMachine:
    """Raise :class:`ConfigError` (:class:`~kvmkit.config.ConfigErrors` for
    several), each problem one line naming the file and key, after looking at
    everything.  ``pm``: the plugin manager to register the plugins with
    (``kvmkit run`` passes its own); ``problems``: those found before (the
    machine file's own, see ``machine_from_dict``), reported with these."""
    problems = problems if problems is not None else Problems()
    pm = pm or new_manager()
    where = str(config.source or "command line")
    _check_host_fit(config, where, problems)

    available = installed_kinds()
    for t in config.devices:
        if t.kind not in available:
            have = ", ".join(sorted(available)) or "none"
            problems.add(f"{t.where}: unknown device kind {t.kind!r}: no plugin installed provides "
                         f"it (installed kinds: {have}); pip install the plugin that does")
    try:
        loaded = load_kinds(pm, [t.kind for t in config.devices if t.kind in available])
    except PluginError as e:
        problems.add(e)
        loaded = {}
    devices: list[DeviceConfig | None] = []
    for t in config.devices:
        device = None
        if t.kind in loaded:
            try:
                device = validate_device(t, loaded[t.kind].spec)
            except ConfigError as e:
                problems.add(e)
        devices.append(device)
    queues = _queue_backends(config, devices, problems)
    valid = tuple(d for d in devices if d is not None)
    for message in check_devices(pm, valid, config):     # the plugins' own checks
        problems.add(message)

    kernel = config.kernel
    data, fmt = b"", ""
    if kernel.image is not None and _check_readable(where, "image", kernel.image, problems):
        try:
            data = map_file(kernel.image)        # the segment checks need the whole file
            fmt = kernel_format(where, kernel.image, data)
        except OSError as e:
            problems.add(f"{where}: [kernel] image: cannot read {kernel.image}: {e.strerror}")
        except ConfigError as e:
            problems.add(e)
    if kernel.initrd is not None and _check_readable(where, "initrd", kernel.initrd, problems):
        if kernel.initrd.stat().st_size == 0:
            problems.add(f"{where}: [kernel] initrd: {kernel.initrd} is empty")
    problems.raise_any()
    return CheckedMachine(config, fmt, data, valid, loaded, queues)


def host_memory() -> int | None:
    """What one anonymous mapping may take on this host: RAM plus swap, or
    None when the kernel overcommits without limit (vm.overcommit_memory = 1)."""
    try:
        if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "1":
            return None
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(info[k].split()[0]) << 10 for k in ("MemTotal", "SwapTotal") if k in info)
    except (OSError, ValueError):
        return None


def _check_host_fit(config: MachineConfig, where: str, problems: Problems) -> None:
    """The machine's memory and name against what this host can give."""
    limit = host_memory()
    if limit is not None and config.memory > limit:
        problems.add(f"{where}: [machine] memory: {format_size(config.memory)} is more than this "
                     f"host's memory and swap ({limit >> 20} MiB); give less")
    message = check_socket_name(config.name)
    if message:
        problems.add(f"{where}: [machine] name: {message}")


def _queue_backends(config: MachineConfig, devices, problems: Problems) -> tuple[str | None, ...]:
    """Resolve each valid virtio device's ``queue`` key (a missing backend is
    an error); one entry per valid device, in order."""
    names = []
    for table, device in zip(config.devices, devices):
        if device is None:
            continue
        if "queue" not in device:
            names.append(None)
            continue
        try:
            names.append(resolve_queue_backend(device["queue"], f"{table.where}: queue").name)
        except BackendError as e:
            problems.add(e)
            names.append(None)
    return tuple(names)


def _check_readable(where: str, key: str, path: Path, problems: Problems) -> bool:
    message = None
    if not path.exists():
        message = f"{path} not found"
    elif not path.is_file():
        message = f"{path} is not a file"
    else:
        try:
            with open(path, "rb") as f:
                f.read(1)
        except OSError as e:
            message = f"cannot read {path}: {e.strerror}"
    if message:
        problems.add(f"{where}: [kernel] {key}: {message}")
    return message is None


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
