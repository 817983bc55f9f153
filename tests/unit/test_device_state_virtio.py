"""Saving and restoring a virtio device behind the core's real virtio-pci
transport (kvmkit.device_state), on a machine without KVM (FakeMachine):
config space, BARs, MSI-X routes, transport registers, queue indices, the
model's own state, python and native queues."""
import json

import pytest

from kvmkit.device_state import StateError, StateUnsupported, restore_device, save_device
from kvmkit.fake_machine import FakeMachine
from kvmkit.memory import GuestMemory
from kvmkit.plugin_api import VirtioDevice
from kvmkit.virtio.pci_test_driver import PciVirtioDriver
from kvmkit.virtio.pci_transport import STATUS_DRIVER_OK

MEM = 1 << 21


class Counter(VirtioDevice):
    """Answers each request with a running count (4 bytes): state of its own."""
    device_id = 0x3E
    features = 1 << 0
    queue_sizes = (8, 8)

    def __init__(self):
        super().__init__()
        self.count = 0
        self.held = []            # queue 1: chains kept until the next kick

    def process(self, index):
        q = self.queues[index]
        if index == 1:
            for chain in self.held:
                q.push(chain.head, 0)
            self.held = []
            while (chain := q.pop()) is not None:
                self.held.append(chain)
            return
        while (chain := q.pop()) is not None:
            self.count += 1
            chain.write(q.memory, 0, self.count.to_bytes(4, "little"))
            q.push(chain.head, 4)

    def snapshot_state(self):
        # chains held across process() calls go back to the ring (un-popped)
        q = self.queues[1] if self.queues else None
        if q is not None and self.held:
            q.last_avail_idx = (q.last_avail_idx - len(self.held)) & 0xFFFF
            self.held = []
        return {"count": self.count}

    def restore_state(self, state):
        self.count = state["count"]


def machine_with(queue="python", memory=None):
    m = FakeMachine(memory or GuestMemory(MEM, backing=bytearray(MEM)))
    ctx = m.context("counter.0")
    model = Counter()
    runtime = ctx.add_virtio(model, queue=queue)
    return m, ctx, model, runtime


def restored_copy(machine, ctx, model, queue="python"):
    state = save_device(ctx, model)
    json.loads(json.dumps(state))                 # plain data only
    mem = GuestMemory(MEM, backing=bytearray(machine.memory.read(0, MEM)))
    m2, ctx2, model2, rt2 = machine_with(queue, memory=mem)
    restore_device(ctx2, model2, state)
    return state, m2, ctx2, model2, rt2


def count_of(drv, queue=0):
    head, wr = drv.submit(queue, writable=[4])
    used = drv.notify(queue)
    assert [h for h, _ in used] == [head]
    return int.from_bytes(drv.written(wr, 4), "little")


@pytest.mark.parametrize("queue", ["python", "native"])
def test_running_device_continues_after_restore_on_a_fresh_machine(queue):
    m, ctx, model, rt = machine_with(queue)
    drv = PciVirtioDriver(m, rt, bar_address=0xE000_0000)
    assert [count_of(drv) for _ in range(3)] == [1, 2, 3]
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model, queue)
    assert type(rt2.transport.active[0]).__name__ == ("SplitQueue" if queue == "python"
                                                     else "NativeSplitQueue")
    assert state["version"] == 1
    # The guest-visible registers are back, through the bus at the guest's BAR.
    drv2 = drv.clone(m2, rt2)
    assert rt2.transport.config.bar(0).address == 0xE000_0000
    assert drv2.status & STATUS_DRIVER_OK
    assert drv2.common(0x04, 4) == drv.common(0x04, 4)
    # The ioeventfds sit at the notify addresses of the guest's BAR.
    assert sorted(m2.vm.ioeventfds) == sorted(m.vm.ioeventfds)
    # MSI-X routes: the same (address, data) per GSI.
    assert m2.vm.msi_routes() == m.vm.msi_routes() and m2.vm.msi_routes()
    # One interrupt per active queue after the restore (a lost one would hang a driver).
    assert rt2.vectors[0].routed and rt2.vectors[1].routed
    # Both continue identically.
    assert count_of(drv2) == 4 and count_of(drv) == 4
    assert save_device(ctx2, model2) == save_device(ctx, model)


@pytest.mark.parametrize("queue", ["python", "native"])
def test_indices_and_event_idx_bookkeeping_survive(queue):
    m, ctx, model, rt = machine_with(queue)
    drv = PciVirtioDriver(m, rt, event_idx=True)
    for _ in range(5):
        count_of(drv)
    q = rt.transport.active[0]
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model, queue)
    q2 = rt2.transport.active[0]
    assert (q2.last_avail_idx, q2.used_idx) == (q.last_avail_idx, q.used_idx) == (5, 5)
    assert state["virtio"][0]["transport"]["rings"][0]["signalled_used"] == 5


def test_chains_made_available_but_not_kicked_are_served_after_restore():
    m, ctx, model, rt = machine_with()
    drv = PciVirtioDriver(m, rt)
    count_of(drv)
    head, wr = drv.submit(0, writable=[4])
    drv.queues[0].publish()                           # the kick is still in flight at the save
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model)
    drv2 = drv.clone(m2, rt2)
    m2.run_kicks()                                    # restore kicked every active queue
    assert drv2.queues[0].used() == [(head, 4)]
    assert int.from_bytes(drv2.written(wr, 4), "little") == 2


@pytest.mark.parametrize("queue", ["python", "native"])
def test_held_chains_are_given_back_not_lost(queue):
    m, ctx, model, rt = machine_with(queue)
    drv = PciVirtioDriver(m, rt)
    head, _ = drv.submit(1, writable=[4])
    assert drv.notify(1) == []                        # held by the model
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model, queue)
    drv2 = drv.clone(m2, rt2)
    assert drv2.notify(1) == []                       # popped again by the restored model
    head2, _ = drv2.submit(1, writable=[4])
    assert drv2.notify(1) == [(head, 0)]              # ...and returned at the next kick


def test_intx_device_restores_its_interrupt_line():
    m, ctx, model, rt = machine_with()
    drv = PciVirtioDriver(m, rt, msix=False)
    count_of(drv)
    assert rt.transport.isr                            # not read by the driver yet
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model)
    assert rt2.transport.isr & 1
    assert m2.vm.lines.get(rt2.line.gsi) == 1


def test_device_the_driver_never_started_restores_as_fresh():
    m, ctx, model, rt = machine_with()
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model)
    assert rt2.transport.status == 0 and rt2.transport.active == []
    drv2 = PciVirtioDriver(m2, rt2)
    assert count_of(drv2) == 1


def test_state_of_another_device_is_refused():
    m, ctx, model, rt = machine_with()
    PciVirtioDriver(m, rt)
    state = save_device(ctx, model)
    state["virtio"][0]["device_id"] = 2
    m2, ctx2, model2, _ = machine_with()
    with pytest.raises(StateError, match="counter.0.*type 2"):
        restore_device(ctx2, model2, state)
    with pytest.raises(StateError, match="version 7"):
        restore_device(ctx2, model2, {**state, "version": 7})


def test_a_device_without_state_support_is_refused_naming_it():
    m = FakeMachine(GuestMemory(MEM, backing=bytearray(MEM)))
    ctx = m.context("gadget.0")
    with pytest.raises(StateUnsupported, match="^device gadget.0: its plugin has no state support"):
        save_device(ctx, object())


def test_a_model_that_refuses_is_named_in_the_refusal():
    from kvmkit.plugin_api import StateUnsupported as Refusal

    class Mounted(Counter):
        def snapshot_state(self):
            raise Refusal("share mounted; unmount it first")

    m = FakeMachine(GuestMemory(MEM, backing=bytearray(MEM)))
    ctx = m.context("fs.0")
    model = Mounted()
    ctx.add_virtio(model, queue="python")
    with pytest.raises(StateUnsupported, match="^device fs.0: share mounted; unmount it first$"):
        save_device(ctx, model)


@pytest.mark.parametrize("queue", ["python", "native"])
def test_a_broken_queue_stays_broken_until_the_driver_resets(queue):
    from kvmkit.virtio.pci_transport import STATUS_NEEDS_RESET
    m, ctx, model, rt = machine_with(queue)
    drv = PciVirtioDriver(m, rt)
    drv.queues[0].submit_head(77)                     # a head outside the 8-entry table
    drv.notify(0)
    assert rt.transport.status & STATUS_NEEDS_RESET
    state, m2, ctx2, model2, rt2 = restored_copy(m, ctx, model, queue)
    assert state["virtio"][0]["transport"]["rings"][0]["broken"]
    assert rt2.transport.status & STATUS_NEEDS_RESET and rt2.transport.active[0].broken
    drv2 = PciVirtioDriver(m2, rt2, rings_at=0x40000, buffers_at=0x90000)   # reset, set up again
    assert not rt2.transport.status & STATUS_NEEDS_RESET
    assert count_of(drv2) == model2.count == 1
