"""The machine a ``kvmkit run`` or ``kvmkit check`` command line describes:
the machine file (or ``defaults.toml``) with the flags applied."""
from __future__ import annotations

import tomllib
from pathlib import Path

from .config import ConfigError, load_machine_file, machine_from_dict
from .plugins import installed_kinds


def _parse_value(text: str):
    """A --device value: a TOML scalar (0x3f8, true, 1.5, "x") or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_device_flag(text: str) -> dict:
    """``kind,key=value,...`` -> a [[device]] table."""
    kind, *pairs = text.split(",")
    if not kind or "=" in kind:
        raise ConfigError(f"--device {text!r}: start with the device kind, e.g. "
                          "--device serial8250,backend=file,path=console.log")
    table: dict = {"kind": kind}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--device {text!r}: {pair!r} is not key=value")
        table[key] = _parse_value(value)
    return table


def _defaults() -> dict:
    # next to this module in every install (importlib.resources costs 15 ms to import)
    return tomllib.loads(Path(__file__).with_name("defaults.toml").read_text())


def machine_config(args, problems=None):
    """The machine file (or the defaults) with the command-line flags applied
    (``problems``: see :func:`~kvmkit.config.machine_from_dict`)."""
    cwd = Path.cwd()
    if args.machine:
        source = Path(args.machine)
        data = load_machine_file(source)
        base_dir, default_name = source.parent.absolute(), source.stem
    else:
        source, base_dir, default_name = None, cwd, "kvmkit"
        data = _defaults()
        installed = installed_kinds()
        flagged = {parse_device_flag(d)["kind"] for d in args.device}
        data["device"] = [d for d in data.get("device", [])
                          if d["kind"] in installed and d["kind"] not in flagged]
        if args.kernel is None:
            raise ConfigError("no machine file and no --kernel: give a machine file "
                              "(kvmkit run machine.toml) or --kernel PATH")
    machine = data.setdefault("machine", {})
    kernel = data.setdefault("kernel", {})
    for flag, table, key in (("name", machine, "name"), ("memory", machine, "memory"),
                             ("vcpus", machine, "vcpus"), ("host_quirks", machine, "host_quirks"),
                             ("stall_timeout", machine, "stall_timeout"),
                             ("append", kernel, "cmdline")):
        value = getattr(args, flag)
        if value is not None:
            table[key] = value
    for flag, key in (("kernel", "image"), ("initrd", "initrd")):
        value = getattr(args, flag)
        if value is not None:                # flags are relative to the working directory
            kernel[key] = str((cwd / value).absolute())
    if isinstance(data.get("device", []), list):
        data.setdefault("device", []).extend(parse_device_flag(d) for d in args.device)
    return machine_from_dict(data, source=source, base_dir=base_dir, default_name=default_name,
                             problems=problems)
