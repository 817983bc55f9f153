"""Run a block with this process out of file descriptors (``kvmkit.testing``).

A user's script that leaks connections, or a host short of descriptors,
makes every ``accept()``, ``open()`` and ``socket()`` in the VMM fail with
EMFILE.  A listener that gives up then, or retries in a busy loop, is a
bug a test can show:

    from kvmkit.testing import descriptors_exhausted

    with descriptors_exhausted():
        client.connect(path)          # connect() takes no new descriptor here
        time.sleep(0.5)               # the listener's accept() fails meanwhile
    # descriptors are back: the listener must serve `client` now

The soft RLIMIT_NOFILE is lowered to just above the highest descriptor in
use and every free number below it is taken, so the limit holds for every
thread of the process; both are undone on leaving the block.  Keep the
block short: the whole process is out of descriptors while it runs.

A thread already blocked in accept() holds the descriptor it will return
(the kernel takes it before waiting), so the first connection still gets
through; connect a throwaway client first to see the second one refused.
"""
from __future__ import annotations

import contextlib
import os
import resource

__all__ = ["descriptors_exhausted"]


@contextlib.contextmanager
def descriptors_exhausted():
    """Yield with no descriptor free in this process (see the module doc);
    yields how many descriptors it took."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    taken: list[int] = []
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    try:
        while True:
            try:
                taken.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break
        yield len(taken)
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
