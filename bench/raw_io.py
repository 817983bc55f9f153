"""The raw baseline for bench/blk_queue.py: a pread/pwrite loop in C.

Built with cffi (API mode) on first use (bench/cbuild.py), so the baseline
pays no Python cost per call, like the native queue engine.
"""
from __future__ import annotations

from cbuild import load as _build

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
    return _build("raw_io", SOURCE, CDEF)
