"""Device state restored on real KVM machines (hand-made guests, no kernel):
a virtio-blk device saved on one machine and restored on another takes the
guest's kick through the ioeventfd restore put at the guest's notify address,
with the request the guest made available before the save still there."""
import errno
import os
import struct
import threading

import pytest

import tiny
from kvmkit.device_context import DeviceContext
from kvmkit.device_state import restore_device, save_device
from kvmkit.testing import config, plugin_manager
from kvmkit.virtio.pci_test_driver import PciVirtioDriver
from kvmkit.virtio.pci_transport import NOTIFY
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.plugin import SPEC, plugin

OUT_CF9 = bytes([0x66, 0xBA, 0xF9, 0x0C, 0xEE])      # mov dx, 0xcf9 ; out dx, al
SPIN = bytes([0xEB, 0xFE])


@pytest.fixture(autouse=True)
def kvm():
    tiny.need_kvm()


def blk(m, image, queue):
    ctx = DeviceContext(m, "virtio-blk.0")
    dev = plugin_manager(plugin).hook.kvmkit_create_device(
        kind="virtio-blk", config=config(SPEC, path=image, queue=queue), ctx=ctx)
    m.devices.append((ctx, dev))
    return ctx, dev, ctx.virtio_runtimes[0]


def kick_and_wait(notify: int, used_idx_at: int, until: int) -> bytes:
    """Write queue 0's notify address, spin until used.idx reaches ``until``,
    then reset through 0xCF9 (the test's way to end the guest)."""
    return (b"\x48\xb8" + struct.pack("<Q", notify)          # mov rax, notify
            + b"\x66\xc7\x00\x00\x00"                          # mov word [rax], 0
            + b"\x48\xbb" + struct.pack("<Q", used_idx_at)    # mov rbx, &used.idx
            + b"\x66\x81\x3b" + struct.pack("<H", until)      # cmp word [rbx], until
            + b"\x75\xf7"                                      # jne back to the cmp
            + b"\xb0\x06" + OUT_CF9 + SPIN)


# (saved on, restored on): `kvmkit run --restore --set virtio-blk.0.queue=...`
# may move a queue between the Python queue and the C engine.
@pytest.mark.parametrize("queue,restored_queue", [("python", "python"), ("native", "native"),
                                                  ("python", "native"), ("native", "python")])
def test_restored_disk_takes_the_guests_kick_and_serves_what_was_pending(tmp_path, queue,
                                                                        restored_queue):
    if "native" in (queue, restored_queue):
        from requirement import need_module
        need_module("kvmkit_native", "kvmkit-native")
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    a = tiny.machine()
    try:
        ctx_a, dev_a, rt_a = blk(a, image, queue)
        rt_a.start()
        drv = PciVirtioDriver(a, rt_a)
        head, _ = drv.submit(0, [p.HEADER.pack(p.T_OUT, 0, 2), b"S" * 512], [1])
        assert [h for h, _ in drv.notify(0)] == [head]
        # A read made available but not kicked yet: in flight at the save.
        read_head, read_buf = drv.submit(0, [p.HEADER.pack(p.T_IN, 0, 2)], [512, 1])
        drv.queues[0].publish()
        rt_a.pause()
        with ctx_a.lock:                              # what Machine.pause holds
            state = save_device(ctx_a, dev_a)
        memory = a.memory.read(0, a.memory.size)
    finally:
        a.close()
    b = tiny.machine()
    b.memory.write(0, memory)
    ctx_b, dev_b, rt_b = blk(b, image, restored_queue)
    restore_device(ctx_b, dev_b, state)
    notify = rt_b.transport.config.bar(0).address + NOTIFY
    probe = os.eventfd(0)
    try:
        with pytest.raises(OSError) as taken:         # restore put the ioeventfd there
            b.vm.ioeventfd(probe, notify, 2)
        assert taken.value.errno == errno.EEXIST
    finally:
        os.close(probe)
    if restored_queue == "python":
        os.eventfd_read(rt_b.queue_fds[0])            # forget restore's own kick: the guest's counts
    drv_b = drv.clone(b, rt_b)
    used_idx_at = drv_b.queues[0].used_ring + 2
    tiny.long_mode(b, kick_and_wait(notify, used_idx_at, until=2))
    timer = threading.Timer(20, b.request_stop, ("test timeout", tiny.TIMEOUT_CODE))
    timer.start()
    try:
        stop = b.run()
        assert (stop.code, stop.reason) == (0, "guest reset (port 0xCF9, hard)"), stop
        assert [h for h, _ in drv_b.queues[0].used()] == [read_head]
        assert drv_b.written(read_buf, 513) == b"S" * 512 + bytes([p.S_OK])
    finally:
        timer.cancel()
        b.close()
