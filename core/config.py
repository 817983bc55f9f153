"""Machine files: TOML in, validated frozen dataclasses out.

Every error is one line naming the file and the key, and what would fix it.
Device tables are validated against the typed schema (``DeviceSpec.keys``)
their plugin declares; no plugin parses TOML itself.
"""
from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any, Mapping

from .plugin_api import DeviceConfig, DeviceSpec, Key, Size

MIN_MEMORY = 16 << 20
MAX_VCPUS = 254                     # APIC ids 0..253, the IOAPIC takes the next id
HOST_QUIRKS = ("auto", "on", "off")


class ConfigError(Exception):
    """A machine file (or command line) asks for something invalid."""


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    image: Path
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


def _check_keys(table: Mapping, allowed: set[str], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise _err(where, f"unknown key {key!r} (known: {', '.join(sorted(allowed))})")


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
                      default_name: str = "kvmkit") -> MachineConfig:
    """Validate a parsed machine file.  ``base_dir`` anchors relative paths."""
    label = str(source) if source else "command line"
    _check_keys(data, TOP_KEYS, label)

    machine = data.get("machine", {})
    if not isinstance(machine, dict):
        raise _err(label, "[machine] must be a table")
    _check_keys(machine, MACHINE_KEYS, f"{label}: [machine]")
    name = machine.get("name", default_name)
    if not isinstance(name, str) or not name or "/" in name:
        raise _err(f"{label}: [machine] name", "expected a non-empty name without '/'")
    memory = parse_memory(machine.get("memory", "256M"), f"{label}: [machine] memory")
    vcpus = parse_vcpus(machine.get("vcpus", 1), f"{label}: [machine] vcpus")
    quirks = machine.get("host_quirks", "auto")
    if quirks not in HOST_QUIRKS:
        raise _err(f"{label}: [machine] host_quirks", f"expected one of {', '.join(HOST_QUIRKS)}")
    acpi = machine.get("acpi", True)
    if not isinstance(acpi, bool):
        raise _err(f"{label}: [machine] acpi", f"expected true or false, got {acpi!r}")
    stall = machine.get("stall_timeout", 0)
    if isinstance(stall, bool) or not isinstance(stall, (int, float)) or not 0 <= stall < 1e9:
        raise _err(f"{label}: [machine] stall_timeout",
                   f"expected a number of seconds (0 turns the watchdog off), got {stall!r}")

    kernel = data.get("kernel")
    if not isinstance(kernel, dict) or "image" not in kernel:
        raise _err(label, "[kernel] image is missing: name the guest kernel (bzImage or vmlinux)")
    _check_keys(kernel, KERNEL_KEYS, f"{label}: [kernel]")
    for key in ("image", "initrd", "cmdline"):
        if key in kernel and not isinstance(kernel[key], str):
            raise _err(f"{label}: [kernel] {key}", "expected a string")
    image = (base_dir / kernel["image"]).absolute()
    initrd = (base_dir / kernel["initrd"]).absolute() if kernel.get("initrd") else None
    kernel_cfg = KernelConfig(image, initrd, kernel.get("cmdline", ""))

    tables = data.get("device", [])
    if not isinstance(tables, list):
        raise _err(label, "devices are written as [[device]] tables")
    devices = []
    for i, table in enumerate(tables):
        where = f"{label}: device[{i}]"
        if not isinstance(table, dict):
            raise _err(where, "expected a table")
        kind = table.get("kind")
        if not isinstance(kind, str) or not kind:
            raise _err(where, "missing 'kind' (the device plugin's name, see `kvmkit plugins`)")
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
    """Check a device table against its kind's schema; fill in defaults."""
    known = {k.name for k in spec.keys}
    for name in table.values:
        if name not in known:
            hint = f"known keys: {', '.join(sorted(known))}" if known else "it takes no keys"
            raise _err(table.where, f"unknown key {name!r} ({hint})")
    values = {}
    for key in spec.keys:
        if key.name in table.values:
            values[key.name] = _coerce(key, table.values[key.name], table.where, table.base_dir)
        elif key.required:
            raise _err(table.where, f"missing required key {key.name!r} ({key.type_name}: {key.doc})")
        else:
            values[key.name] = key.default
    return DeviceConfig(spec.kind, values, table.where)
