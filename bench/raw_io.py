"""The raw baseline for bench/blk_queue.py: a pread/pwrite loop in C.

Built with cffi (API mode) on first use into ~/.cache/kvmkit/bench, so the
baseline pays no Python cost per call, like the native queue engine.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
from pathlib import Path

SOURCE = r"""
#include <stdint.h>
#include <unistd.h>

/* n transfers of bs bytes at offsets[i], into or from buffer i % nbufs of
 * ``bufs`` (nbufs * bs bytes: the same memory footprint as a queue of nbufs
 * requests); returns how many completed in full. */
static long raw_loop(int fd, char *bufs, long nbufs, long bs, const int64_t *offsets, long n,
                     int write)
{
    long i;
    for (i = 0; i < n; i++) {
        char *buf = bufs + (i % nbufs) * bs;
        ssize_t done = write ? pwrite(fd, buf, bs, offsets[i]) : pread(fd, buf, bs, offsets[i]);
        if (done != bs)
            break;
    }
    return i;
}
"""
CDEF = ("long raw_loop(int fd, char *bufs, long nbufs, long bs, const int64_t *offsets, long n, "
        "int write);")


def load():
    """The compiled module (ffi, lib), building it if needed."""
    from cffi import FFI
    tag = hashlib.sha256((SOURCE + CDEF + sys.version).encode()).hexdigest()[:12]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmkit" / "bench"
    name = f"_raw_io_{tag}"
    cache.mkdir(parents=True, exist_ok=True)
    found = list(cache.glob(f"{name}*.so"))
    if not found:
        ffi = FFI()
        ffi.cdef(CDEF)
        ffi.set_source(name, SOURCE)
        found = [Path(ffi.compile(tmpdir=str(cache)))]
    spec = importlib.util.spec_from_file_location(name, found[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ffi, module.lib
