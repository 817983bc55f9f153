"""Machine files: TOML in, validated frozen dataclasses out.

Every error is one line naming the file and the key, and what would fix it.
Device tables are validated against the typed schema (``DeviceSpec.keys``)
their plugin declares; no plugin parses TOML itself.
"""
from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .plugin_api import DeviceConfig, DeviceSpec, Key, Size

MIN_MEMORY = 16 << 20
MAX_VCPUS = 254                     # APIC ids 0..253, the IOAPIC takes the next id
HOST_QUIRKS = ("auto", "on", "off")
NAME_MAX = 64                       # the name is in socket paths (AF_UNIX: 107 bytes in all)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ConfigError(Exception):
    """A machine file (or command line) asks for something invalid."""


class ConfigErrors(ConfigError):
    """Every problem found in a machine (``kvmkit check`` reports them all):
    ``messages``, one line each."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(self.messages))


class Problems:
    """Collects one-line problems instead of stopping at the first."""

    def __init__(self):
        self.messages: list[str] = []

    def add(self, e: Exception | str) -> None:
        lines = e.messages if isinstance(e, ConfigErrors) else [str(e)]
        self.messages.extend(lines)

    def __bool__(self) -> bool:
        return bool(self.messages)

    def raise_any(self) -> None:
        if len(self.messages) == 1:
            raise ConfigError(self.messages[0])
        if self.messages:
            raise ConfigErrors(self.messages)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    image: Path | None                  # None only while problems are being collected
    initrd: Path | None = None
    cmdline: str = ""


@dataclasses.dataclass(frozen=True)
class DeviceTable:
    """A ``[[device]]`` table before its plugin's schema is known."""
    kind: str
    values: Mapping[str, Any]
    where: str                      # "machine.toml: device[1]" for messages
    base_dir: Path                  # relative paths resolve against this


@dataclasses.dataclass(frozen=True)
class MachineConfig:
    name: str
    memory: int
    vcpus: int
    kernel: KernelConfig
    devices: tuple[DeviceTable, ...] = ()
    host_quirks: str = "auto"
    source: Path | None = None
    acpi: bool = True               # ACPI tables (RSDP, XSDT, FADT, MADT, DSDT) besides the MP table
    stall_timeout: float = 0.0      # seconds without any vCPU exit before the VM is stopped; 0: off


MACHINE_KEYS = {"name", "memory", "vcpus", "host_quirks", "acpi", "stall_timeout"}
KERNEL_KEYS = {"image", "initrd", "cmdline"}
TOP_KEYS = {"machine", "kernel", "device"}


def _err(where: str, message: str) -> ConfigError:
    return ConfigError(f"{where}: {message}")


def _check_keys(table: Mapping, allowed: set[str], where: str, problems: Problems) -> None:
    for key in table:
        if key not in allowed:
            problems.add(_err(where, f"unknown key {key!r} (known: {', '.join(sorted(allowed))})"))


def parse_name(value: Any, where: str) -> str:
    """A machine name: it names the control and console sockets and the log."""
    if not isinstance(value, str):
        raise _err(where, f"expected a string, got {value!r}")
    if not value or len(value) > NAME_MAX or not NAME_PATTERN.fullmatch(value):
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise _err(where, f"{shown!r} is not a machine name: use 1-{NAME_MAX} letters, digits, "
                   "'.', '_' or '-', starting with a letter or digit")
    return value


def parse_memory(value: Any, where: str) -> int:
    try:
        size = Size.parse(value)
    except ValueError as e:
        raise _err(where, f"{e}") from None
    if size < MIN_MEMORY:
        raise _err(where, f"{size} bytes is too little memory; give at least 16M")
    if size % 4096:
        raise _err(where, "memory must be a multiple of 4K")
    return int(size)


def parse_vcpus(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_VCPUS:
        raise _err(where, f"expected a whole number of vCPUs from 1 to {MAX_VCPUS}, got {value!r}")
    return value


def load_machine_file(path: Path) -> dict:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: machine file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the machine file: {e}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None


def machine_from_dict(data: Mapping, *, source: Path | None, base_dir: Path,
                      default_name: str = "kvmkit", problems: Problems | None = None) -> MachineConfig:
    """Validate a parsed machine file.  ``base_dir`` anchors relative paths.
    Raises ConfigError for one problem, ConfigErrors (a subclass) for several;
    with ``problems`` given, adds them there and returns what it could make of
    the file (``kvmkit check`` goes on to find the rest)."""
    collect = problems if problems is not None else Problems()
    config = _machine_from_dict(data, source, base_dir, default_name, collect)
    if problems is None:
        collect.raise_any()
    return config


def _checked(problems: Problems, parse, value, where: str, fallback):
    try:
        return parse(value, where)
    except ConfigError as e:
        problems.add(e)
        return fallback


def _machine_from_dict(data: Mapping, source: Path | None, base_dir: Path, default_name: str,
                       problems: Problems) -> MachineConfig:
    label = str(source) if source else "command line"
    _check_keys(data, TOP_KEYS, label, problems)

    machine = data.get("machine", {})
    if not isinstance(machine, dict):
        problems.add(_err(label, "[machine] must be a table"))
        machine = {}
    _check_keys(machine, MACHINE_KEYS, f"{label}: [machine]", problems)
    name = _checked(problems, parse_name, machine.get("name", default_name),
                    f"{label}: [machine] name", "kvmkit")
    memory = _checked(problems, parse_memory, machine.get("memory", "256M"),
                      f"{label}: [machine] memory", 256 << 20)
    vcpus = _checked(problems, parse_vcpus, machine.get("vcpus", 1), f"{label}: [machine] vcpus", 1)
    quirks = machine.get("host_quirks", "auto")
    if quirks not in HOST_QUIRKS:
        problems.add(_err(f"{label}: [machine] host_quirks", f"expected one of {', '.join(HOST_QUIRKS)}"))
        quirks = "auto"
    acpi = machine.get("acpi", True)
    if not isinstance(acpi, bool):
        problems.add(_err(f"{label}: [machine] acpi", f"expected true or false, got {acpi!r}"))
        acpi = True
    stall = machine.get("stall_timeout", 0)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 <= stall < 1e9:
        problems.add(_err(f"{label}: [machine] stall_timeout",
                          f"expected a number of seconds (0 turns the watchdog off), got {stall!r}"))
        stall = 0

    kernel = data.get("kernel")
    if not isinstance(kernel, dict) or "image" not in kernel:
        problems.add(_err(label, "[kernel] image is missing: name the guest kernel (bzImage or vmlinux)"))
        kernel = kernel if isinstance(kernel, dict) else {}
    _check_keys(kernel, KERNEL_KEYS, f"{label}: [kernel]", problems)
    values = {}
    for key in ("image", "initrd", "cmdline"):
        if key in kernel and not isinstance(kernel[key], str):
            problems.add(_err(f"{label}: [kernel] {key}", "expected a string"))
        elif key in kernel and "\0" in kernel[key]:
            problems.add(_err(f"{label}: [kernel] {key}", "contains a NUL character"))
        elif key in kernel:
            values[key] = kernel[key]
    image = (base_dir / values["image"]).absolute() if values.get("image") else None
    initrd = (base_dir / values["initrd"]).absolute() if values.get("initrd") else None
    kernel_cfg = KernelConfig(image, initrd, values.get("cmdline", ""))

    tables = data.get("device", [])
    if not isinstance(tables, list):
        problems.add(_err(label, "devices are written as [[device]] tables"))
        tables = []
    devices = []
    for i, table in enumerate(tables):
        where = f"{label}: device[{i}]"
        if not isinstance(table, dict):
            problems.add(_err(where, "expected a table"))
            continue
        kind = table.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.add(_err(where, "missing 'kind' (the device plugin's name, see `kvmkit plugins`)"))
            continue
        devices.append(DeviceTable(kind, {k: v for k, v in table.items() if k != "kind"},
                                   f"{where} ({kind})", base_dir))
    return MachineConfig(name, memory, vcpus, kernel_cfg, tuple(devices), quirks, source, acpi,
                         float(stall))


def load_machine(path: Path) -> MachineConfig:
    path = Path(path)
    data = load_machine_file(path)
    return machine_from_dict(data, source=path, base_dir=path.parent.absolute(),
                             default_name=path.stem)


# -- device schemas --------------------------------------------------------------------
def _coerce(key: Key, value: Any, where: str, base_dir: Path) -> Any:
    where = f"{where}: {key.name}"
    t = key.type
    if value is None and key.default is None:
        return None
    if t is bool:
        if not isinstance(value, bool):
            raise _err(where, f"expected true or false, got {value!r}")
    elif t is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _err(where, f"expected an integer, got {value!r}")
    elif t is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _err(where, f"expected a number, got {value!r}")
        value = float(value)
    elif t is str:
        if not isinstance(value, str):
            raise _err(where, f"expected a string, got {value!r}")
    elif t is Path:
        if not isinstance(value, str) or not value:
            raise _err(where, f"expected a path string, got {value!r}")
        if "\0" in value:
            raise _err(where, f"{value!r} contains a NUL character")
        value = (base_dir / value).absolute()
    elif t is Size:
        try:
            value = Size.parse(value)
        except ValueError as e:
            raise _err(where, str(e)) from None
    elif t is list:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _err(where, f"expected a list of strings, got {value!r}")
        value = tuple(value)
    else:
        raise _err(where, f"the plugin declares an unsupported key type {t!r}")
    if key.choices is not None and value not in key.choices:
        raise _err(where, f"{value!r} is not one of {', '.join(map(repr, key.choices))}")
    if key.min is not None and value < key.min:
        raise _err(where, f"{value!r} is below the minimum {key.min!r}")
    if key.max is not None and value > key.max:
        raise _err(where, f"{value!r} is above the maximum {key.max!r}")
    return value


def validate_device(table: DeviceTable, spec: DeviceSpec) -> DeviceConfig:
    """Check a device table against its kind's schema; fill in defaults.
    Every bad key of the table is reported (ConfigErrors when several)."""
    problems = Problems()
    known = {k.name for k in spec.keys}
    for name in table.values:
        if name not in known:
            hint = f"known keys: {', '.join(sorted(known))}" if known else "it takes no keys"
            problems.add(_err(table.where, f"unknown key {name!r} ({hint})"))
    values = {}
    for key in spec.keys:
        if key.name in table.values:
            try:
                values[key.name] = _coerce(key, table.values[key.name], table.where, table.base_dir)
            except ConfigError as e:
                problems.add(e)
        elif key.required:
            problems.add(_err(table.where, f"missing required key {key.name!r} "
                              f"({key.type_name}: {key.doc})"))
        else:
            values[key.name] = key.default
    problems.raise_any()
    return DeviceConfig(spec.kind, values, table.where)
