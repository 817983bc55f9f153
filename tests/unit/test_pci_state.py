"""Config space and MSI-X table state for snapshots: saved and put back into a
fresh function with the side effects the guest's writes had."""
import pytest

from kvmkit.pci import MsixCapability, MsixTable
from kvmkit.pci.config_space import ConfigSpace


def function(events, vector_changes, controls):
    cfg = ConfigSpace(vendor_id=0x1234, device_id=0x11, class_code=0xFF0000, interrupt_pin=1,
                      on_change=events.append)
    cfg.add_bar(0, 0x4000, "mem64")
    cfg.add_bar(2, 0x100, "io")
    table = MsixTable(3, on_vector_change=vector_changes.append,
                      on_control_change=lambda e, m: controls.append((e, m)))
    cap = MsixCapability(table, 0, 0x2000, 0, 0x3000)
    cap.install(cfg)
    return cfg, table, cap


def test_restored_function_maps_its_bars_and_enables_msix_again():
    ev_a, vec_a, ctl_a = [], [], []
    cfg, table, cap = function(ev_a, vec_a, ctl_a)
    cfg.write(0x10, 4, 0xE000_0000)
    cfg.write(0x14, 4, 0x1)                          # BAR 0 at 0x1_e000_0000
    cfg.write(0x18, 4, 0xC100)                       # BAR 2 (I/O)
    cfg.write(0x04, 2, 0x0007)                       # I/O, memory, bus master
    cfg.write(0x3C, 1, 0x0B)
    table.write(16, 4, 0xFEE0_1000)                  # vector 1: address, data, unmasked
    table.write(24, 4, 0x41)
    table.write(28, 4, 0)
    cfg.write(cap.offset + 2, 2, 0x8000)             # MSI-X on
    table.fire(2)                                    # masked: left pending
    saved_cfg, saved_table = cfg.save_state(), table.save_state()

    ev_b, vec_b, ctl_b = [], [], []
    cfg2, table2, cap2 = function(ev_b, vec_b, ctl_b)
    table2.restore_state(saved_table)
    cfg2.restore_state(saved_cfg)
    assert vec_b == [1]                              # the routes of changed vectors are set again
    assert ctl_b == [(True, False)] and table2.enabled
    assert ("command", 0, 7) in ev_b                 # the owner maps the BARs
    assert [b.address for b in cfg2.decoded_bars()] == [0x1_E000_0000, 0xC100]
    assert cfg2.read(0x3C, 1) == 0x0B and table2.pending(2) and not table2.pending(1)
    assert [cfg2.read(o, 4) for o in range(0, 256, 4)] == [cfg.read(o, 4) for o in range(0, 256, 4)]
    assert table2.vector(1) == table.vector(1)


def test_state_of_another_function_is_refused():
    cfg, _, _ = function([], [], [])
    other = ConfigSpace(vendor_id=0x1234, device_id=0x12, class_code=0xFF0000)
    with pytest.raises(ValueError, match="another function .*device id"):
        other.restore_state(cfg.save_state())
    with pytest.raises(ValueError, match="holds 3 bytes"):
        cfg.restore_state("abcdef")
    _, table, _ = function([], [], [])
    with pytest.raises(ValueError, match="MSI-X state holds 16 table bytes, the table has 48"):
        table.restore_state({"entries": "00" * 16, "pending": 0})
