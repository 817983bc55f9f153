"""Build the benchmarks' C baselines (cffi, API mode) on first use.

The modules go to ``$XDG_CACHE_HOME/kvmkit-bench`` (``~/.cache/kvmkit-bench``),
named by a hash of their source, so a changed baseline is rebuilt and an
unchanged one is loaded without a compiler.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmkit-bench"


def load(stem: str, source: str, cdef: str):
    """The compiled module ``(ffi, lib)`` for ``source`` declaring ``cdef``."""
    from cffi import FFI
    tag = hashlib.sha256((source + cdef + sys.version).encode()).hexdigest()[:12]
    cache = cache_dir()
    name = f"_{stem}_{tag}"
    cache.mkdir(parents=True, exist_ok=True)
    found = list(cache.glob(f"{name}*.so"))
    if not found:
        ffi = FFI()
        ffi.cdef(cdef)
        ffi.set_source(name, source)
        found = [Path(ffi.compile(tmpdir=str(cache)))]
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib
