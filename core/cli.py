"""The ``kvmkit`` command.

Start-up time is part of what kvmkit offers, so this module imports only
``argparse``: each command imports what it needs when it runs (``kvmkit
--version`` loads no machine code, ``kvmkit list`` no KVM code).
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .cli_control import add_commands as add_control_commands
from .cli_inspect import add_commands as add_inspect_commands
from .cli_sandbox import add_command as add_sandbox_command
from .cli_sandbox import add_host_root_flags
from .cli_snapshot import add_command as add_snapshot_command
from .cli_snapshot import add_run_flags as add_restore_flags

EXIT_ERROR = 1                 # kvmkit.plugin_api's EXIT_ERROR and EXIT_USAGE, without importing it
EXIT_USAGE = 2

# Errors that mean bad input (EXIT_USAGE) or a failure of KVM (EXIT_ERROR):
# (module, class).  A class whose module was never imported cannot have been
# raised, so main() looks only in sys.modules.
_ERRORS = ((EXIT_USAGE, "kvmkit.config", "ConfigError"), (EXIT_USAGE, "kvmkit.plugins", "PluginError"),
           (EXIT_USAGE, "kvmkit.machine", "MachineError"), (EXIT_USAGE, "kvmkit.control", "ControlError"),
           (EXIT_USAGE, "kvmkit.snapshot_format", "SnapshotError"),
           (EXIT_ERROR, "kvmkit.hypervisor.kvm", "KvmUnavailable"),
           (EXIT_ERROR, "kvmkit.hypervisor.kvm", "KvmError"))


def _error_status(error: Exception) -> int | None:
    for status, module, name in _ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(error, cls):
            return status
    return None


def setup_logging(verbose: int, log_file: str | None) -> None:
    import logging
    level = logging.WARNING - 10 * min(verbose, 2)
    console = logging.StreamHandler(sys.stderr)
    if sys.stderr.isatty():              # the serial console may hold the terminal raw
        console.terminator = "\r\n"
    handlers: list[logging.Handler] = [console]
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    fmt = logging.Formatter("kvmkit: %(name)s: %(message)s")
    for h in handlers:
        h.setFormatter(fmt)
    root = logging.getLogger("kvmkit")
    root.handlers[:] = handlers
    root.setLevel(level)
    root.propagate = False


def _summary(machine, stop, elapsed: float) -> str:
    from .vcpu import EXIT_NAMES
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
    vcpus = ", ".join(f"vCPU {v['index']} {v['exits']}"
                      + f" (last {v['last_exit']}" + (f", RIP {v['rip']})" if v["rip"] else ")")
                      for v in machine.vcpu_exits())
    return (f"kvmkit: {machine.config.name}: {stop.reason}; ran {elapsed:.1f} s, "
            f"{total} exits ({rate:.0f}/s{': ' + parts if parts else ''})"
            f"{'; ' + vcpus if vcpus else ''}"
            f"{'; ' + queues if queues else ''}")


def _host_root(args) -> bool:
    """`kvmkit run` with neither a machine file nor a kernel nor an initrd:
    boot the found kernel on the host's files, a shell on the console."""
    return not args.machine and args.kernel is None and args.initrd is None


def _host_root(args) -> bool:
    """`kvmkit run` with neither a machine file nor a kernel nor an initrd:
    boot the found kernel on the host's files, a shell on the console."""
    return not args.machine and args.kernel is None and args.initrd is None


def cmd_run(args) -> int:
    from .config import ConfigError
    if args.restore:
        from .cli_snapshot import run_restore
        return run_restore(args, _run)
    if args.set or args.force:
        raise ConfigError("--set and --force go with --restore PATH")
    if _host_root(args):
        if args.detach:
            raise ConfigError("--detach: a host-root shell runs on your terminal; give a "
                              "machine file or --kernel to run detached")
        from .cli_sandbox import run_host_root
        return run_host_root(args, [], error_status=2)
    if args.rw or args.rwdir or args.overlay_rwdir:
        raise ConfigError("--rw, --rwdir and --overlay-rwdir are for the host-root guest "
                          "(kvmkit run with no machine file and no --kernel, or kvmkit sandbox)")
    from .config import Problems
    from .machine_flags import machine_config
    from .plugins import new_manager
    from .preflight import check_machine
    problems = Problems()
    config = machine_config(args, problems)
    pm = new_manager()
    checked = check_machine(config, pm, problems)   # every problem, before a socket or a VM exists
    if args.detach:
        from .detach import run_detached
        return run_detached(config.name, lambda ready: _run(config, ready, pm, checked))
    return _run(config, None, pm, checked)


def _run(config, ready=None, pm=None, checked=None, *, on_built=None, summary: bool = True,
         snapshot=None) -> int:
    """Build and run the machine with its control socket; ``ready()`` is
    called once it is built (a detached parent waits for that), and
    ``on_built(machine)`` too (``kvmkit sandbox`` sets its timer there).
    ``snapshot``: restore it instead of booting the kernel."""
    import signal
    import time

    from .control import ControlServer
    from .machine import Machine
    machine = Machine(config, pm, checked)
    control = ControlServer(machine, config.name)
    stop = None
    try:
        machine.build(snapshot)
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
        import logging
        logging.getLogger("kvmkit").info("%s", _summary(machine, stop, elapsed))
    return stop.code


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, sized as shutil.get_terminal_size() would
    size it, without importing shutil (and with it zlib, bz2 and lzma): argparse
    makes a formatter for every add_argument, so every start paid for it."""

    def __init__(self, prog, indent_increment=2, max_help_position=24, width=None):
        if width is None:
            try:
                columns = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    columns = 80
            width = columns - 2
        super().__init__(prog, indent_increment, max_help_position, width)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser with _Formatter (its subcommands' parsers are _Parsers
    too) and kvmkit's error format: one ``kvmkit: error:`` line and status 2,
    not a usage block; ``--help`` shows the usage."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        command = self.prog.removeprefix("kvmkit").strip()
        self.exit(EXIT_USAGE, f"kvmkit: error: {command + ': ' if command else ''}{message} "
                              f"(see {self.prog} --help)\n")


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
    run.add_argument("--stall-timeout", dest="stall_timeout", type=float, metavar="SECONDS",
                     help="stop the VM (status 6) when no vCPU exits for this long (default: off)")
    run.add_argument("--device", "-d", action="append", default=[], metavar="KIND,KEY=VALUE,...",
                     help="add a device (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmkit", description="A KVM virtual machine monitor "
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
    add_restore_flags(run)
    run.set_defaults(func=cmd_run)
    add_inspect_commands(sub, run)
    add_sandbox_command(sub, run)
    add_control_commands(sub)
    add_snapshot_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(2 if args.debug else args.verbose, args.log_file)
    try:
        return args.func(args)
    except Exception as e:
        status = _error_status(e)
        if status is None:
            raise
        if args.debug:
            import logging
            logging.getLogger("kvmkit").exception("details")
        for line in getattr(e, "messages", None) or [str(e)]:     # ConfigErrors: one line each
            print(f"kvmkit: error: {line}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
