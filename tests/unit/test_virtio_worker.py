"""A virtio model that raises in process() stops the VM, naming the device."""
import os
import threading
import types

from kvmkit.plugin_api import EXIT_ERROR
from kvmkit.virtio.runtime import VirtioPciRuntime


class Boom:
    def notify(self, index):
        raise RuntimeError("model bug")


def test_worker_exception_stops_the_vm_with_the_device_name():
    stops = []
    stopping = threading.Event()
    ctx = types.SimpleNamespace(name="virtio-thing.0", lock=threading.RLock(), stopping=stopping,
                                request_stop=lambda reason, code: (stops.append((reason, code)),
                                                                   stopping.set()))
    rt = VirtioPciRuntime.__new__(VirtioPciRuntime)      # only the worker's state
    rt.ctx, rt.transport = ctx, Boom()
    rt.queue_fds = [os.eventfd(0, os.EFD_NONBLOCK)]
    rt.stop_fd = os.eventfd(0, os.EFD_NONBLOCK)
    rt.wake_fd = os.eventfd(0, os.EFD_NONBLOCK)
    rt.offloads, rt._generation = {}, 0
    os.eventfd_write(rt.queue_fds[0], 1)
    t = threading.Thread(target=rt._work)
    t.start()
    t.join(timeout=5)
    assert not t.is_alive()
    assert stops == [("device virtio-thing.0 failed: RuntimeError: model bug", EXIT_ERROR)]
    for fd in (*rt.queue_fds, rt.stop_fd, rt.wake_fd):
        os.close(fd)
