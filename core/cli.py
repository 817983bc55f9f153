"""The ``kvmkit`` command."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import tomllib
from importlib import resources
from pathlib import Path

from . import __version__
from .cli_control import add_commands as add_control_commands
from .cli_inspect import add_commands as add_inspect_commands
from .cli_sandbox import add_command as add_sandbox_command
from .cli_sandbox import add_host_root_flags, run_host_root
from .config import ConfigError, load_machine_file, machine_from_dict
from .control import ControlError, ControlServer
from .detach import run_detached
from .hypervisor.kvm import KvmError, KvmUnavailable
from .machine import Machine, MachineError
from .plugins import PluginError, installed_kinds
from .plugin_api import EXIT_ERROR, EXIT_USAGE
from .vcpu import EXIT_NAMES

log = logging.getLogger("kvmkit")


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
    return tomllib.loads(resources.files("kvmkit").joinpath("defaults.toml").read_text())


def machine_config(args):
    """The machine file (or the defaults) with the command-line flags applied."""
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
    return machine_from_dict(data, source=source, base_dir=base_dir, default_name=default_name)


class _TerminalSafeHandler(logging.StreamHandler):
    """Log lines end in CR LF while the serial console may hold the terminal raw."""

    def __init__(self):
        super().__init__(sys.stderr)
        if sys.stderr.isatty():
            self.terminator = "\r\n"


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    handlers: list[logging.Handler] = [_TerminalSafeHandler()]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    fmt = logging.Formatter("kvmkit: %(name)s: %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger("kvmkit")
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = False


def _summary(machine: Machine, stop, elapsed: float) -> str:
    counts = machine.exit_counts()
    total = sum(counts.values())
    parts = ", ".join(f"{EXIT_NAMES.get(k, k)} {v}" for k, v in
                      sorted(counts.items(), key=lambda kv: -kv[1])[:4])
    rate = total / elapsed if elapsed > 0 else 0
    by_backend: dict[str, list[str]] = {}
    for device, backend in machine.queue_backends().items():
        by_backend.setdefault(backend, []).append(device)
    queues = "; ".join(f"{backend} virtqueues ({', '.join(devices)})"
                       for backend, devices in by_backend.items())
    return (f"kvmkit: {machine.config.name}: {stop.reason}; ran {elapsed:.1f} s, "
            f"{total} exits ({rate:.0f}/s{': ' + parts if parts else ''})"
            f"{'; ' + queues if queues else ''}")


def _host_root(args) -> bool:
    """`kvmkit run` with neither a machine file nor a kernel nor an initrd:
    boot the found kernel on the host's files, a shell on the console."""
    return not args.machine and args.kernel is None and args.initrd is None


def cmd_run(args) -> int:
    if _host_root(args):
        if args.detach:
            raise ConfigError("--detach: a host-root shell runs on your terminal; give a "
                              "machine file or --kernel to run detached")
        return run_host_root(args, [])
    if args.rw or args.rwdir or args.overlay_rwdir:
        raise ConfigError("--rw, --rwdir and --overlay-rwdir are for the host-root guest "
                          "(kvmkit run with no machine file and no --kernel, or kvmkit sandbox)")
    config = machine_config(args)
    if args.detach:
        return run_detached(config.name, lambda ready: _run(config, ready))
    return _run(config)


def _run(config, ready=None, *, on_built=None, summary: bool = True) -> int:
    """Build and run the machine with its control socket; ``ready()`` is
    called once it is built (a detached parent waits for that), and
    ``on_built(machine)`` too (``kvmkit sandbox`` sets its timer there)."""
    machine = Machine(config)
    control = ControlServer(machine, config.name)
    stop = None
    try:
        machine.build()
        if on_built is not None:
            on_built(machine)
        stop_signals = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129}
        for signo, code in stop_signals.items():
            signal.signal(signo, lambda s, _f, c=code: machine.request_stop(
                f"stopped by {signal.Signals(s).name}", c))
        if ready is not None:
            ready()
        t0 = time.monotonic()
        stop = machine.run()
        elapsed = time.monotonic() - t0
    finally:
        machine.close()
        if stop is not None:
            control.stopped(stop.reason, stop.code)
        control.close()
    if summary:
        print(_summary(machine, stop, elapsed), file=sys.stderr, flush=True)
    else:
        log.info("%s", _summary(machine, stop, elapsed))
    return stop.code


def add_machine_flags(run) -> None:
    """The flags `run`, `check` and `sandbox` share."""
    run.add_argument("--kernel", "-k", help="guest kernel (bzImage or vmlinux)")
    run.add_argument("--initrd", "-i", help="initial ramdisk")
    run.add_argument("--append", "-p", help="kernel command line (replaces the file's)")
    run.add_argument("--memory", "-m", help="guest memory, e.g. 256M")
    run.add_argument("--vcpus", "-c", type=int, help="number of vCPUs")
    run.add_argument("--name", help="machine name")
    run.add_argument("--host-quirks", dest="host_quirks", choices=["auto", "on", "off"],
                     help="nested paravirtual KVM assists (default: auto-detect)")
    run.add_argument("--device", "-d", action="append", default=[], metavar="KIND,KEY=VALUE,...",
                     help="add a device (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvmkit", description="A KVM virtual machine monitor "
                                "whose devices are plugins.")
    p.add_argument("--version", action="version", version=f"kvmkit {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    p.add_argument("--log-file", help="also write the log to this file")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="boot a machine",
                         description="Boot a machine file; flags override its values. Without a "
                         "machine file, --kernel is required and the default devices are used.")
    run.add_argument("machine", nargs="?", help="machine file (TOML)")
    add_machine_flags(run)
    run.add_argument("--detach", action="store_true",
                     help="run in the background; `kvmkit console NAME` attaches to its console")
    add_host_root_flags(run)
    run.set_defaults(func=cmd_run)
    add_inspect_commands(sub, run)
    add_sandbox_command(sub, run)
    add_control_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(2 if args.debug else args.verbose, args.log_file)
    try:
        return args.func(args)
    except (ConfigError, PluginError, MachineError, ControlError) as e:
        if args.debug:
            log.exception("details")
        print(f"kvmkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KvmUnavailable, KvmError) as e:
        if args.debug:
            log.exception("details")
        print(f"kvmkit: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
