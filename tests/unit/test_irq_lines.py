"""Interrupt lines shared by several devices behave like wired-OR ISA lines."""
from kvmkit.irq import Gsi, IrqLine


class FakeVm:
    def __init__(self):
        self.calls = []

    def irq_line(self, gsi, level):
        self.calls.append((gsi, level))


def test_level_changes_reach_kvm_once():
    vm = FakeVm()
    line = IrqLine(Gsi(vm, 4))
    line.set_level(True)
    line.set_level(True)
    line.set_level(False)
    line.set_level(False)
    assert vm.calls == [(4, 1), (4, 0)]


def test_shared_line_stays_high_while_any_device_asserts_it():
    vm = FakeVm()
    gsi = Gsi(vm, 4)
    com1, com3 = IrqLine(gsi), IrqLine(gsi)
    com1.set_level(True)
    com3.set_level(True)
    com1.set_level(False)
    assert vm.calls == [(4, 1)]
    com3.set_level(False)
    assert vm.calls == [(4, 1), (4, 0)]


def test_pulse_is_an_edge_unless_the_line_is_held():
    vm = FakeVm()
    gsi = Gsi(vm, 8)
    a, b = IrqLine(gsi), IrqLine(gsi)
    a.pulse()
    assert vm.calls == [(8, 1), (8, 0)]
    b.set_level(True)
    a.pulse()
    assert vm.calls == [(8, 1), (8, 0), (8, 1)]
