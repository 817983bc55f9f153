"""Which kernel ``kvmkit run``/``kvmkit sandbox`` boot when not told: the
current directory's build first, then the running kernel (kvmtool's order)."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["candidates", "find_kernel", "KernelNotFound"]


class KernelNotFound(Exception):
    pass


def candidates(cwd: Path, release: str | None = None) -> list[Path]:
    release = release or os.uname().release
    return [cwd / "bzImage", cwd / "arch" / "x86" / "boot" / "bzImage",
            Path("/boot") / f"vmlinuz-{release}"]


def find_kernel(cwd: Path, release: str | None = None) -> Path:
    tried = candidates(cwd, release)
    for path in tried:
        if path.is_file():
            return path
    raise KernelNotFound("no kernel found (looked for " + ", ".join(map(str, tried)) +
                         "); give one with --kernel PATH")
