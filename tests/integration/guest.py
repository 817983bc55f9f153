"""Boot a guest with the kvmkit command and collect what it prints, with times."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

KVMKIT = [sys.executable, "-m", "kvmkit"]


def cache_dir() -> Path:
    return Path(os.environ.get("KVMKIT_CACHE", Path.home() / ".cache" / "kvmkit"))


def kit() -> dict[str, Path]:
    """The guest kit's products (guest/build-kit writes kit.env)."""
    env = cache_dir() / "kit.env"
    out = {}
    if env.is_file():
        for line in env.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = Path(shlex.split(value)[0]) if value.strip() else None
    return out


@dataclasses.dataclass
class Boot:
    returncode: int
    lines: list[tuple[float, str]]       # (host time.time() when read, console line)
    stderr: str
    wall: float
    started: float                       # host time.time() when kvmkit was started

    @property
    def console(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def find(self, pattern: str):
        """The first console line matching ``pattern``: (host time, match) or None."""
        rx = re.compile(pattern)
        for t, line in self.lines:
            m = rx.search(line)
            if m:
                return t, m
        return None

    def describe(self) -> str:
        tail = "\n".join(line for _, line in self.lines[-40:])
        return f"exit {self.returncode} after {self.wall:.0f}s\n--- console tail\n{tail}\n--- stderr\n{self.stderr[-3000:]}"


def run_kvmkit(args: list[str], timeout: float = 900, cwd: Path | None = None,
               when: str | None = None, then=None, triggers=(), stdin=subprocess.DEVNULL,
               env: dict | None = None) -> Boot:
    """Run kvmkit until it exits (terminated after ``timeout`` s).  If ``when``
    (a regex) matches a console line, ``then(proc)`` is called once, on its own
    thread, while reading goes on; ``triggers`` are more such (regex, function)
    pairs.  ``stdin`` may be ``subprocess.PIPE``: the functions then type to the
    console through ``proc.stdin``.  ``env``: kvmkit's environment."""
    t0, started = time.monotonic(), time.time()
    pending = [(re.compile(rx), fn) for rx, fn in triggers]
    if when:
        pending.append((re.compile(when), then))
    proc = subprocess.Popen(KVMKIT + args, stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=cwd, env=env)
    lines: list[tuple[float, str]] = []
    err: list[bytes] = []

    def read_out():
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append((time.time(), line))
            for pair in list(pending):
                if pair[0].search(line):
                    pending.remove(pair)
                    threading.Thread(target=pair[1], args=(proc,), daemon=True).start()

    def read_err():
        err.append(proc.stderr.read())

    threads = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in threads:
        t.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for t in threads:
        t.join(timeout=10)
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass
    return Boot(proc.returncode, lines, b"".join(err).decode("utf-8", "replace"), time.monotonic() - t0,
                started)


def newc(files: dict[str, bytes]) -> bytes:
    """An uncompressed newc cpio archive of regular files (mode 0755)."""
    out, ino = b"", 0x4B000
    for name, data in files.items():
        ino += 1
        raw = name.encode() + b"\0"
        head = b"070701" + b"".join(b"%08X" % v for v in (ino, 0o100755, 0, 0, 1, 0, len(data),
                                                            0, 0, 0, 0, len(raw), 0))
        out += head + raw + b"\0" * (-(len(head) + len(raw)) % 4) + data + b"\0" * (-len(data) % 4)
    trailer = b"TRAILER!!!\0"
    head = b"070701" + b"".join(b"%08X" % v for v in (0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
                                                        len(trailer), 0))
    out += head + trailer + b"\0" * (-(len(head) + len(trailer)) % 4)
    return out + b"\0" * (-len(out) % 512)


def initrd_with_hooks(kit: dict, path: Path, hooks: dict[str, str], tools: bool = False) -> Path:
    """The kit's busybox initramfs plus ``hooks`` (name -> shell script) as
    /etc/kvmkit-tests/NAME.sh, which its /init runs in name order; with
    ``tools``, also the kit's tools.cpio (/bin/kvmkit-io)."""
    path.write_bytes(kit["BUSYBOX_CPIO"].read_bytes()
                     + (kit["TOOLS_CPIO"].read_bytes() if tools else b"")
                     + newc({f"etc/kvmkit-tests/{name}.sh": text.encode() for name, text in hooks.items()}))
    return path


def seeded_bytes(seed: int, size: int) -> bytes:
    """What the kit's ``kvmkit-rand SEED SIZE`` writes (guest/kvmkit-rand.c):
    the splitmix64 stream from ``seed``, each output little-endian."""
    mask = (1 << 64) - 1
    out = bytearray()
    state = seed & mask
    while len(out) < size:
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out += (z ^ (z >> 31)).to_bytes(8, "little")
    return bytes(out[:size])


# The devices most test machines have: the console, the clock and the reset.
CONSOLE_CLOCK_RESET = ({"kind": "serial8250"}, {"kind": "rtc"}, {"kind": "i8042"})


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))           # a TOML basic string


def machine_file(path: Path, *, image, cmdline: str, initrd=None, vcpus: int = 1,
                 memory: str = "256M", name: str | None = None, acpi: bool | None = None,
                 devices=CONSOLE_CLOCK_RESET, extra_devices=()) -> Path:
    """Write a machine file: [machine], [kernel], then one [[device]] table
    per dict in ``devices`` and ``extra_devices``."""
    machine = {"memory": memory, "vcpus": vcpus}
    if name is not None:
        machine["name"] = name
    if acpi is not None:
        machine["acpi"] = acpi
    kernel = {"image": image, "cmdline": cmdline}
    if initrd is not None:
        kernel["initrd"] = initrd
    parts = ["[machine]", *(f"{k} = {_toml_value(v)}" for k, v in machine.items()),
             "", "[kernel]", *(f"{k} = {_toml_value(v)}" for k, v in kernel.items())]
    for table in (*devices, *extra_devices):
        parts += ["", "[[device]]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    path.write_text("\n".join(parts) + "\n")
    return path


def one_error_line(result, *needles, status: int | None = None) -> str:
    """The one ``kvmkit: error:`` line a failed run printed (no traceback), which
    must hold every needle; the run must have exited ``status`` (any failure
    when None).  ``result``: a CompletedProcess."""
    if status is None:
        assert result.returncode != 0
    else:
        assert result.returncode == status, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("kvmkit: error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]
