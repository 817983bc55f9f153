"""What the guest init is told (the job) and what it reports (the status).
Both formats are documented at the top of ``init.c``."""
from __future__ import annotations

import dataclasses
import os
from pathlib import PurePosixPath

__all__ = ["Job", "Outcome", "parse_status", "EXIT_TIMEOUT", "EXIT_SANDBOX_ERROR",
           "EXIT_GUEST_PANIC", "EXIT_SIGNAL_BASE"]

# kvmkit sandbox's own exit statuses (README "kvmkit sandbox: exit status");
# anything else is the command's.
EXIT_GUEST_PANIC = 123       # the guest kernel panicked (pvpanic)
EXIT_TIMEOUT = 124           # --timeout ran out (as timeout(1))
EXIT_SANDBOX_ERROR = 125     # kvmkit or the guest init failed; the command's status is unknown
EXIT_SIGNAL_BASE = 128       # the command was killed by signal N: 128 + N (as shells report)


@dataclasses.dataclass
class Job:
    argv: list[str]                                   # empty: an interactive shell
    cwd: str
    env: dict[str, str]
    uid: int = dataclasses.field(default_factory=os.getuid)
    gid: int = dataclasses.field(default_factory=os.getgid)
    groups: list[int] = dataclasses.field(default_factory=os.getgroups)
    tty: bool = False
    tmpfs: list[str] = dataclasses.field(default_factory=list)
    rwdirs: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (tag, path)
    rodirs: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (tag, path)
    overlays: list[str] = dataclasses.field(default_factory=list)
    hostname: str = "kvmkit"

    def encode(self) -> bytes:
        records = [("uid", str(self.uid)), ("gid", str(self.gid)),
                   ("groups", ",".join(map(str, self.groups))), ("cwd", self.cwd),
                   ("hostname", self.hostname)]
        records += [("tmpfs", p) for p in self.tmpfs]
        # Parents before children; on one path: the share, then the overlay on it.
        mounts = [(path, 0, "rodir", f"{tag}:{path}") for tag, path in self.rodirs]
        mounts += [(path, 1, "overlay", path) for path in self.overlays]
        mounts += [(path, 2, "rwdir", f"{tag}:{path}") for tag, path in self.rwdirs]
        mounts.sort(key=lambda m: (PurePosixPath(m[0]).parts, m[1]))
        records += [(key, value) for _, _, key, value in mounts]
        if self.tty:
            records.append(("tty", "1"))
        records += [("env", f"{k}={v}") for k, v in self.env.items()]
        records += [("arg", a) for a in self.argv]
        out = bytearray()
        for key, value in records:
            raw = value.encode("utf-8", "surrogateescape")
            if b"\0" in raw:
                raise ValueError(f"{key} {value!r} contains a NUL byte")
            out += key.encode() + b"=" + raw + b"\0"
        return bytes(out)


@dataclasses.dataclass(frozen=True)
class Outcome:
    code: int
    message: str = ""           # for the user when the command did not simply exit


def parse_status(text: str) -> Outcome | None:
    """The init's status line (None when it reported nothing)."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    kind, _, rest = line.partition(" ")
    if kind == "exit" and rest.isdigit():
        return Outcome(int(rest) & 0xFF)
    if kind == "signal" and rest.isdigit():
        return Outcome(EXIT_SIGNAL_BASE + int(rest), f"the command was killed by signal {rest}")
    if kind == "error":
        return Outcome(EXIT_SANDBOX_ERROR, f"guest init: {rest}")
    if line:
        return Outcome(EXIT_SANDBOX_ERROR, f"guest init reported {line[:80]!r}")
    return None
