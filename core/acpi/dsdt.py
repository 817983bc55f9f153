"""The DSDT's AML: the PCI host bridge, interrupt links for PCI INTx, the
power button and its Generic Event Device, \\_S5, and each device's own node.

PCI INTx lines are level-triggered and active high on KVM's IOAPIC (the MP
table says so too).  A _PRT entry with a bare GSI means level/active-low to
the OS, so each INTx GSI gets an interrupt link device (PNP0C0F) whose
resources say level/active-high.
"""
from __future__ import annotations

from typing import NamedTuple

from . import aml

PCI_CONFIG_PORT = 0xCF8
GIB = 1 << 30
HIGH_WINDOW_SIZE = 32 * GIB        # 64-bit PCI window above RAM
PHYS_LIMIT = 1 << 39               # keep the window below what any x86-64 CPU addresses
S5_SLP_TYP = 5                     # the SLP_TYP value \_S5 hands the OS (ours to choose)
POWER_BUTTON_NOTIFY = 0x80         # "button pressed" (5.6.6)
OSPM_READY = 1                     # GED._INI wrote this: the guest runs ACPI
EVENT_TAKEN = 2                    # GED._EVT wrote this: the guest took a power-button event


class PciLayout(NamedTuple):
    io_windows: tuple[tuple[int, int], ...]       # inclusive (lo, hi) I/O port windows
    mmio32: tuple[int, int]                       # inclusive 32-bit memory window
    mmio64: tuple[int, int] | None                # inclusive 64-bit memory window, or none
    intx: tuple[tuple[int, int, int], ...]        # (slot, pin 1-4, gsi)


def high_window(ram_top: int) -> tuple[int, int] | None:
    """The 64-bit window: from the first GiB boundary above RAM (and 4 GiB)."""
    start = max(4 * GIB, -(-ram_top // GIB) * GIB)
    end = start + HIGH_WINDOW_SIZE
    return (start, end - 1) if end <= PHYS_LIMIT else None


def link_name(gsi: int) -> str:
    return f"LK{gsi:02d}"


def pci_host(layout: PciLayout) -> bytes:
    windows = [aml.word_bus_number(0, 0), aml.io(PCI_CONFIG_PORT, 8)]
    windows += [aml.word_io(lo, hi) for lo, hi in layout.io_windows]
    windows.append(aml.dword_memory(*layout.mmio32))
    if layout.mmio64:
        windows.append(aml.qword_memory(*layout.mmio64))
    # _PRT: (slot << 16 | 0xFFFF, pin 0-3, link device, 0)
    prt = aml.package(*(aml.package((slot << 16) | 0xFFFF, pin - 1, aml.ref(link_name(gsi)), 0)
                        for slot, pin, gsi in layout.intx))
    return aml.device("PCI0",
                      aml.name("_HID", aml.eisaid("PNP0A03")),
                      aml.name("_UID", 0),
                      aml.name("_SEG", 0),
                      aml.name("_BBN", 0),
                      aml.name("_CRS", aml.resource_template(*windows)),
                      aml.name("_PRT", prt))


def interrupt_link(gsi: int, uid: int) -> bytes:
    res = aml.resource_template(aml.interrupt(gsi, edge=False, active_low=False, shared=True))
    return aml.device(link_name(gsi),
                      aml.name("_HID", aml.eisaid("PNP0C0F")),
                      aml.name("_UID", uid),
                      aml.name("_PRS", res),
                      aml.name("_CRS", res),
                      aml.method("_SRS", 1),
                      aml.method("_DIS", 0))


def power_button(ged_gsi: int, ospm_port: int) -> bytes:
    """PWRB (PNP0C0C) and the GED (ACPI0013) whose interrupt says 'pressed'.

    The GED's _INI tells the VMM that the guest runs ACPI (so the button is
    worth pressing); its _EVT notifies the button and tells the VMM it did."""
    return (aml.device("PWRB", aml.name("_HID", aml.eisaid("PNP0C0C")), aml.name("_UID", 0))
            + aml.device("GED_",
                         aml.name("_HID", "ACPI0013"),
                         aml.name("_UID", 0),
                         aml.name("_CRS", aml.resource_template(aml.interrupt(ged_gsi, edge=True))),
                         aml.operation_region("KVMR", aml.SYSTEM_IO, ospm_port, 1),
                         aml.field("KVMR", ("OSPM", 8)),
                         aml.method("_INI", 0, aml.store(aml.integer(OSPM_READY), aml.ref("OSPM"))),
                         aml.method("_EVT", 1,
                                    aml.if_(aml.lequal(aml.arg(0), aml.integer(ged_gsi)),
                                            aml.notify("\\_SB.PWRB", POWER_BUTTON_NOTIFY),
                                            aml.store(aml.integer(EVENT_TAKEN), aml.ref("OSPM"))))))


def build(layout: PciLayout, *, ged_gsi: int, ospm_port: int, device_nodes=()) -> bytes:
    """The DSDT's AML body: \\_SB with the host bridge, the links, the power
    button and the devices' nodes; \\_S5 at the root."""
    links = sorted({gsi for _slot, _pin, gsi in layout.intx})
    return (aml.scope("\\_SB",
                      pci_host(layout),
                      *(interrupt_link(gsi, i) for i, gsi in enumerate(links)),
                      power_button(ged_gsi, ospm_port),
                      *device_nodes)
            + aml.name("\\_S5_", aml.package(S5_SLP_TYP, S5_SLP_TYP, 0, 0)))
