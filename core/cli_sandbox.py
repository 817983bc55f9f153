"""``kvmkit sandbox [flags] -- CMD ARGS...``, and ``kvmkit run`` with neither
a machine file nor a kernel: boot a kernel on the host's own files and run
a command (or a shell) in it as you, in your working directory.

Exit status: the command's own; 128+N when a signal N killed it; 123 when
the guest kernel panicked; 124 when --timeout ran out; 125 when kvmkit or
the guest init failed (the reason on stderr); 129/130/143 when kvmkit was
stopped by SIGHUP/SIGINT/SIGTERM.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

log = logging.getLogger("kvmkit.sandbox")

STOPPED_BY_SIGNAL = (129, 130, 143)
EXIT_SANDBOX_ERROR = 125        # kvmkit.sandbox.job's, without importing it at start-up


def add_command(sub, run_parser) -> None:
    from .cli import add_machine_flags
    p = sub.add_parser(
        "sandbox",
        help="run a command in a VM on the host's files and exit with its status",
        description="Boot a kernel (--kernel, else ./bzImage, ./arch/x86/boot/bzImage, "
        "/boot/vmlinuz-$(uname -r)) with the host's / as its read-only root (virtio-fs) and "
        "run CMD in the current directory as you: its stdout and stderr are yours, stdin is "
        "forwarded when it is a terminal, and kvmkit exits with its status (128+N for signal N, "
        "123 guest panic, 124 timeout, 125 kvmkit or guest init failed). Without CMD: a shell "
        "on the console.")
    add_machine_flags(p)
    _add_flags(p)
    p.add_argument("--script", metavar="FILE", help="run FILE with /bin/sh (several commands, "
                   "one boot); CMD ARGS become its arguments")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop the VM after SECONDS and exit 124")
    stdin = p.add_mutually_exclusive_group()
    stdin.add_argument("--stdin", dest="stdin", action="store_true", default=None,
                       help="forward stdin even when it is not a terminal")
    stdin.add_argument("--no-stdin", dest="stdin", action="store_false",
                       help="never forward stdin (the command reads end-of-file)")
    p.add_argument("command", nargs="*", metavar="-- CMD ARGS",
                   help="the command and its arguments, after --")
    p.set_defaults(func=cmd_sandbox)


def _add_flags(p) -> None:
    p.add_argument("--rw", action="store_true",
                   help="share the host's root read-write (default: read-only)")
    p.add_argument("--rwdir", action="append", default=[], metavar="DIR",
                   help="make host directory DIR writable in the guest (writes reach the host; repeatable)")
    p.add_argument("--overlay-rwdir", dest="overlay_rwdir", action="append", default=[],
                   metavar="DIR", help="make DIR writable in the guest; writes stay in guest "
                   "memory and are lost at exit (repeatable)")


def add_host_root_flags(run_parser) -> None:
    _add_flags(run_parser)


def cmd_sandbox(args) -> int:
    argv = list(args.command)
    if args.script:
        script = Path(args.script)
        try:
            text = script.read_text()
        except (OSError, UnicodeDecodeError) as e:
            print(f"kvmkit: error: --script {script}: cannot read it: {e}", file=sys.stderr)
            return EXIT_SANDBOX_ERROR
        argv = ["/bin/sh", "-c", text, str(script.absolute()), *argv]
    forward = args.stdin if args.stdin is not None else _isatty(0)
    if not args.verbose and not args.debug:
        # stderr is the command's: the one-time notice about nested-KVM assists
        # would read as its output (-v shows it).
        logging.getLogger("kvmkit.host_quirks").setLevel(logging.ERROR)
    return run_host_root(args, argv, forward_stdin=forward, timeout=args.timeout)


def run_host_root(args, argv: list[str], *, forward_stdin: bool = False,
                  timeout: float | None = None, error_status: int = EXIT_SANDBOX_ERROR) -> int:
    """Boot on the host's root and run ``argv`` (none: a shell on the console).
    A failure before the guest runs exits ``error_status``: 125 for
    ``kvmkit sandbox`` (its documented status), 2 (bad input) for ``kvmkit run``."""
    from .cli import _run
    from .config import ConfigError
    from .control import ControlError
    from .hypervisor.kvm import KvmError, KvmUnavailable
    from .machine import MachineError
    from .machine_flags import parse_device_flag
    from .plugins import PluginError
    from .sandbox.guest_init import InitBuildError, init_binary
    from .sandbox.job import EXIT_TIMEOUT
    from .sandbox.kernels import KernelNotFound, find_kernel
    from .sandbox.plan import Options, make_plan
    errors = (ConfigError, PluginError, MachineError, ControlError, KvmUnavailable, KvmError,
              InitBuildError, KernelNotFound)
    plan = None
    try:
        cwd = Path.cwd()
        kernel = Path(args.kernel) if args.kernel else find_kernel(cwd)
        if args.initrd:
            raise ConfigError("--initrd: the host-root guest boots without an initramfs "
                              "(its root is the host's / over virtio-fs)")
        opts = Options(kernel=kernel, argv=argv, cwd=cwd, memory=args.memory, vcpus=args.vcpus,
                       append=args.append or "", rw=args.rw, rwdirs=args.rwdir,
                       overlay_rwdirs=args.overlay_rwdir, forward_stdin=forward_stdin,
                       name=args.name, host_quirks=args.host_quirks,
                       devices=[parse_device_flag(d) for d in args.device])
        plan = make_plan(opts, init_binary())
        machine_ref = []

        def on_built(machine):
            machine_ref.append(machine)
            if timeout is not None:
                t = threading.Timer(timeout, machine.request_stop,
                                    (f"timeout after {timeout:g} s", EXIT_TIMEOUT))
                t.daemon = True
                t.start()

        code = _run(plan.config, on_built=on_built, summary=False)
        machine = machine_ref[0] if machine_ref else None
        reason = machine.stop.reason if machine is not None and machine.stop else ""
        return _outcome(plan, code, reason)
    except errors as e:
        if getattr(args, "debug", False):
            log.exception("details")
        print(f"kvmkit: error: {e}", file=sys.stderr)
        return error_status
    finally:
        if plan is not None:
            plan.cleanup()


def _outcome(plan, code: int, reason: str) -> int:
    from .plugin_api import EXIT_GUEST_PANIC
    from .sandbox.job import EXIT_GUEST_PANIC as SANDBOX_PANIC
    from .sandbox.job import EXIT_TIMEOUT, parse_status
    try:
        reported = parse_status(plan.status_path.read_text(errors="replace"))
    except OSError:
        reported = None
    if reported is not None:
        if reported.message and reported.code == EXIT_SANDBOX_ERROR:
            print(f"kvmkit: error: {reported.message}", file=sys.stderr)
        return reported.code
    if code == EXIT_GUEST_PANIC:
        print(f"kvmkit: the guest kernel panicked{_log_tail(plan)}", file=sys.stderr)
        return SANDBOX_PANIC
    if code == EXIT_TIMEOUT:
        print(f"kvmkit: {reason}; the command did not finish", file=sys.stderr)
        return EXIT_TIMEOUT
    if code in STOPPED_BY_SIGNAL:
        return code
    print(f"kvmkit: error: the guest ended ({reason or 'no reason'}) without reporting the "
          f"command's status{_log_tail(plan)}", file=sys.stderr)
    return EXIT_SANDBOX_ERROR


def _log_tail(plan, lines: int = 12) -> str:
    if plan.console_log is None:
        return ""
    try:
        text = plan.console_log.read_text(errors="replace")
    except OSError:
        return ""
    text_lines = [line for line in text.splitlines() if line.strip()]
    panic = [i for i, line in enumerate(text_lines) if "Kernel panic - not syncing" in line]
    if panic:                       # the reason, then the end of the stack dump after it
        tail = [text_lines[panic[0]]] + text_lines[panic[0] + 1:][-(lines - 1):]
    else:
        tail = text_lines[-lines:]
    return ("; the guest console's last lines:\n" + "\n".join(tail)) if tail else ""


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False
