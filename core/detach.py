"""`kvmkit run --detach`: run the VM in the background, with a console socket.

The parent validates the machine file, forks, and waits until the child has
built the VM and opened its control socket ("ready"), or has failed (then it
prints the child's error line).  The child leaves the terminal's session,
takes a pseudo-terminal as stdin/stdout (bridged to the console socket) and
logs to ``<runtime dir>/<name>.log``.
"""
from __future__ import annotations

import os
import sys
from typing import Callable

from .console import ConsoleRelay
from .control import runtime_dir
from .plugin_api import EXIT_ERROR


def log_path(name: str):
    return runtime_dir() / f"{name}.log"


def run_detached(name: str, body: Callable[[Callable[[], None]], int]) -> int:
    """Run ``body(ready)`` in a detached child; ``ready()`` releases the parent."""
    log = log_path(name)
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read()
        if said.startswith(b"ready"):
            print(f"kvmkit: {name} is running detached: `kvmkit console {name}` attaches "
                  f"(Ctrl-] detaches), `kvmkit stop {name}` stops it; log: {log}")
            return 0
        _, status = os.waitpid(pid, 0)
        lines = [line for line in log.read_text(errors="replace").splitlines()
                 if line.startswith("kvmkit: error:")] if log.exists() else []
        print(lines[-1] if lines else f"kvmkit: error: {name} failed to start (see {log})",
              file=sys.stderr)
        return os.waitstatus_to_exitcode(status) or EXIT_ERROR

    # the child
    code = EXIT_ERROR
    try:
        os.close(r)
        os.setsid()
        master, slave = os.openpty()
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(slave, 0)
        os.dup2(slave, 1)
        os.dup2(fd, 2)
        for extra in (slave, fd, null):
            os.close(extra)
        relay = ConsoleRelay(master, name)

        def ready() -> None:
            os.write(w, b"ready\n")
            os.close(w)

        try:
            code = body(ready)
        finally:
            relay.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
