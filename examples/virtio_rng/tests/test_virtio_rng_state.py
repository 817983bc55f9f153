"""virtio-rng state for snapshots, through kvmkit.device_state on a
FakeContext: the queue indices and the counters, the device goes on after
restore into a fresh instance on a copy of guest memory."""
import json

from kvmkit.device_state import restore_device, save_device
from kvmkit.memory import GuestMemory
from kvmkit.testing import FakeContext, VirtioTestDriver, config, plugin_manager
from kvmkit_example_virtio_rng.plugin import SPEC, plugin

MEM = 1 << 20


def create(ctx):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="virtio-rng",
                                        config=config(SPEC, max_bytes_per_request=8, queue="python"),
                                        ctx=ctx)


def test_restored_rng_goes_on_from_the_saved_indices():
    with FakeContext(memory_size=MEM) as a:
        dev = create(a)
        drv = VirtioTestDriver(dev, a.memory, lock=a.lock, event_idx=True)
        for _ in range(3):
            assert drv.request(0, writable=[16])[0] == 8
        state = save_device(a, dev)
        assert json.loads(json.dumps(state)) == state
        [saved] = state["virtio_models"]
        assert saved["model"] == {"version": 1, "requests": 3, "bytes_served": 24}
        assert saved["queues"][0]["last_avail"] == 3
        memory = GuestMemory(MEM, backing=bytearray(a.memory.read(0, MEM)))
    with FakeContext(memory=memory) as b:
        dev2 = create(b)
        restore_device(b, dev2, state)
        assert dev2.queues[0].last_avail_idx == 3 and dev2.requests == 3
        drv.memory = memory                      # the guest driver goes on in the copy
        for q in drv.queues:
            q.memory = memory
        drv.buffers.memory = memory
        drv.device, drv.lock = dev2, b.lock
        written, data = drv.request(0, writable=[16])
        assert written == 8 and data != b"\xee" * 8
        assert dev2.requests == 4 and dev2.bytes_served == 32
