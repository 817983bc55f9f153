"""What the engine tests share: the runtime's side of an engine (``Host``)."""
import os
import select

import pytest

from kvmkit.virtio.runtime import QueueWiring


def efd():
    return os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)


class Host:
    """The runtime's side: kick, interrupt and (INTx) resample eventfds for
    one queue (``index``: the only one it wires, None: any)."""

    def __init__(self, intx=False, index=None):
        self.kick, self.irq = efd(), efd()
        self.resample = efd() if intx else -1
        self.index = index
        self.engine = None
        self.released = []

    def wiring(self, index):
        assert self.index is None or index == self.index
        return QueueWiring(self.kick, self.irq, self.resample, self.resample < 0)

    def offload(self, index, engine):
        self.engine = engine

    def release(self, index):
        self.released.append(index)
        self.engine = None

    def interrupts(self, wait=0.0):
        if wait and not select.select([self.irq], [], [], wait)[0]:
            return 0
        try:
            return os.eventfd_read(self.irq)
        except BlockingIOError:
            return 0

    def close(self):
        for fd in (self.kick, self.irq, self.resample):
            if fd >= 0:
                os.close(fd)


@pytest.fixture
def make_host():
    """``make_host(intx=False, index=None)``: a Host, closed after the test
    (after the fixtures that use this one, which stop their engines first)."""
    made = []

    def make(**kw):
        made.append(Host(**kw))
        return made[-1]
    yield make
    for host in made:
        host.close()
