"""kvmkit plugin: the ``pvpanic`` device kind (PCI 1b36:0011, Linux's pvpanic-pci)."""
from __future__ import annotations

from kvmkit.plugin_api import (EXIT_GUEST_PANIC, ConfigSpace, DeviceConfig, DeviceContext,
                               DevicePlugin, DeviceSpec, GuestLog)

from .pvpanic import CRASH_LOADED, PANICKED, SUPPORTED, PvPanic

PCI_VENDOR_REDHAT = 0x1B36
PCI_DEVICE_PVPANIC = 0x0011
PCI_CLASS_SYSTEM_OTHER = 0x088000
BAR_SIZE = 0x1000

SPEC = DeviceSpec(
    kind="pvpanic",
    summary="pvpanic PCI device: a guest kernel panic ends the VM with exit status 4",
    keys=(),
)


class PvPanicDevice:
    def __init__(self, config: DeviceConfig, ctx: DeviceContext):
        self._ctx = ctx
        self._glog = GuestLog(ctx.log)          # the guest may write the register at will
        self.register = PvPanic(self._event)
        self.config = ConfigSpace(vendor_id=PCI_VENDOR_REDHAT, device_id=PCI_DEVICE_PVPANIC,
                                  class_code=PCI_CLASS_SYSTEM_OTHER, revision=1,
                                  subsystem_vendor_id=PCI_VENDOR_REDHAT,
                                  subsystem_id=PCI_DEVICE_PVPANIC)
        self.config.add_bar(0, BAR_SIZE, "mem32")
        ctx.add_pci(self.config, {0: self.register})

    # -- snapshots (kvmkit.device_state): the core saves the PCI function's config
    # space (where the guest put the BAR); the register itself only remembers the
    # events it saw ---------------------------------------------------------------------------
    STATE_VERSION = 1

    def snapshot_state(self) -> dict:
        return {"version": self.STATE_VERSION, "events_seen": self.register.events_seen}

    def restore_state(self, state: dict) -> None:
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"pvpanic state version {state.get('version')!r}; this plugin reads "
                             f"version {self.STATE_VERSION}")
        self.register.events_seen = state["events_seen"] & SUPPORTED

    def _event(self, event: int) -> None:
        if event & PANICKED:
            self._ctx.request_stop("guest kernel panicked (pvpanic)", EXIT_GUEST_PANIC)
        elif event & CRASH_LOADED:
            self._glog.info("crash-loaded", "guest loaded a crash kernel (pvpanic)")


plugin = DevicePlugin(SPEC, PvPanicDevice)
