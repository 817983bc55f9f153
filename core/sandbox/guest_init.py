"""The guest's init: ``init.c`` next to this module, compiled static with
the host's C compiler the first time it is needed, into the user's cache
(``$KVMKIT_SANDBOX_CACHE``, else ``$XDG_CACHE_HOME/kvmkit/sandbox``, else
``~/.cache/kvmkit/sandbox``), named by a hash of the source and the compiler
command, so an edited source gets a new binary.  The guest runs it from the
host's root through virtio-fs; no busybox or initramfs is needed."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["init_binary", "cache_dir", "InitBuildError", "CFLAGS"]

CFLAGS = ["-static", "-Os", "-s", "-Wall"]


class InitBuildError(Exception):
    pass


def cache_dir() -> Path:
    if os.environ.get("KVMKIT_SANDBOX_CACHE"):
        return Path(os.environ["KVMKIT_SANDBOX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvmkit" / "sandbox"


def source() -> bytes:
    return resources.files("kvmkit.sandbox").joinpath("init.c").read_bytes()


def init_binary(directory: Path | None = None) -> Path:
    """The compiled init (built now if it is not in the cache yet)."""
    src = source()
    cc = os.environ.get("CC", "cc")
    digest = hashlib.sha256(src + " ".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    directory = directory or cache_dir()
    target = directory / f"init-{digest}"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    if shutil.which(cc) is None:
        raise InitBuildError(f"building the guest init needs a C compiler ({cc}) and a static "
                             "C library: apt install gcc libc6-dev (or set CC)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InitBuildError(f"cannot create {directory} for the guest init: {e.strerror}") from None
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        c_file = Path(tmp) / "init.c"
        c_file.write_bytes(src)
        out = Path(tmp) / "init"
        result = subprocess.run([cc, *CFLAGS, "-o", str(out), str(c_file)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            first = (result.stderr.strip().splitlines() or ["no output"])[0]
            raise InitBuildError(f"building the guest init with {cc} failed: {first} "
                                 "(a static C library is needed: apt install libc6-dev)")
        os.chmod(out, 0o755)
        os.replace(out, target)                      # atomic: a racing build loses nothing
    return target
