"""Snapshots of a running machine: take one (paused), and put one back into
a machine built from the same configuration (see snapshot_format for the
files, hypervisor.vcpu_state for the KVM state and its restore order).

Taking: pause (vCPUs parked, device locks held, queue engines paused), let
each vCPU finish its last exit (KVM_RUN with immediate_exit), save each
device (a device finishes its in-flight requests into guest memory here, so
devices go before memory), then the KVM state, the platform, guest RAM;
the directory appears only when all of it is written.

Restoring (Machine.build with a snapshot): memory is the snapshot's file
mapped copy-on-write; the devices are created as on a boot, nothing is loaded
into memory (the guest's kernel, ACPI tables and everything it changed are in
it); then the VM state (irqchip, PIT, kvmclock), each vCPU, the platform
registers, and last each device (its restore raises the interrupts a driver
may be waiting for, so the irqchip and LAPICs must be back first).
"""
from __future__ import annotations

import importlib.metadata
import logging
import time
from pathlib import Path

from .hypervisor import vcpu_state
from .snapshot_format import Snapshot, SnapshotError, Writer, machine_to_dict

log = logging.getLogger("kvmkit.snapshot")

# CPUID feature words a restored guest may be using: (leaf, subleaf, register),
# and the bits kvmkit itself sets or the guest's OS flips (not the CPU's).
FEATURE_WORDS = ((1, 0, 5), (1, 0, 6), (7, 0, 4), (7, 0, 5), (7, 0, 6), (0xD, 1, 3),
                 (0x80000001, 0, 5), (0x80000001, 0, 6))
REGISTERS = {3: "eax", 4: "ebx", 5: "ecx", 6: "edx"}
NOT_FEATURES = {(1, 0, 5): (1 << 31) | (1 << 27),     # hypervisor (kvmkit sets it), OSXSAVE (the OS)
                (1, 0, 6): 1 << 28,                   # HTT (kvmkit sets it for SMP)
                (7, 0, 5): 1 << 4}                    # OSPKE (the OS)
TSC_TOLERANCE = 0.001                                 # a relative TSC-rate difference that is the same rate


def _plugin(machine, kind: str) -> tuple[str, str]:
    checked = getattr(machine, "checked", None)
    loaded = checked.kinds.get(kind) if checked is not None else None
    dist = loaded.distribution if loaded is not None else "?"
    try:
        version = importlib.metadata.version(dist)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        version = "?"
    return dist, version


VIRTIO_BLOCK = 2                  # virtio device type of a block device: its ``path`` key is its disk


def block_disks(machine) -> list[dict]:
    """The disk image of each virtio block device: its ``path`` and size now."""
    checked = getattr(machine, "checked", None)
    configs = dict(zip((ctx.name for ctx, _d in machine.devices), checked.devices)) if checked else {}
    disks = []
    for rt in machine.virtio:
        path = configs.get(rt.ctx.name, {}).get("path") if rt.device.device_id == VIRTIO_BLOCK else None
        if path is None:
            continue
        try:
            size = Path(path).stat().st_size
        except OSError as e:
            raise SnapshotError(f"device {rt.ctx.name}: disk {path}: {e.strerror or e}") from None
        disks.append({"device": rt.ctx.name, "path": str(path), "size": size})
    return disks


def disks_in(state) -> list[dict]:
    """Each ``"disk": {"path": ..., "size": ...}`` a device state holds, at any depth."""
    found = []
    if isinstance(state, dict):
        disk = state.get("disk")
        if isinstance(disk, dict) and isinstance(disk.get("path"), str) and isinstance(disk.get("size"), int):
            found.append({"path": disk["path"], "size": disk["size"]})
        for value in state.values():
            found.extend(disks_in(value))
    elif isinstance(state, list):
        for value in state:
            found.extend(disks_in(value))
    return found


# -- taking a snapshot ---------------------------------------------------------------------
def take(machine, path, *, resume: bool = False) -> dict:
    """Snapshot a running (or paused) machine into directory ``path``.

    On success the VM is left paused, or running with ``resume``.  On any
    failure (SnapshotError: a device without state support, a full disk)
    nothing is left at ``path`` and the VM goes back to how it was (running,
    or paused if it was)."""
    was_paused = machine.paused
    t0 = time.monotonic()
    machine.pause()
    if not machine.paused:                        # pause() does nothing to a stopping VM
        raise SnapshotError("the VM is stopping; it cannot be snapshotted")
    try:
        result = _write(machine, Path(path))
    except BaseException:
        if not was_paused:
            machine.resume()
        raise
    result["seconds"] = round(time.monotonic() - t0, 3)
    if resume:
        machine.resume()
    log.info("snapshot %s: %d MiB of memory (%d MiB on disk) in %.3f s", path,
             result["memory"] >> 20, result["memory_on_disk"] >> 20, result["seconds"])
    return result


def _write(machine, path: Path) -> dict:
    with Writer(path) as writer:                  # refuses an existing PATH before anything is done
        for vcpu in machine.vcpus:
            vcpu.complete_pending()
        devices = []
        if machine.devices:
            from .device_state import StateError, StateUnsupported, save_device
            for ctx, device in machine.devices:
                try:
                    state = save_device(ctx, device)
                except (StateUnsupported, StateError) as e:
                    raise SnapshotError(str(e)) from None
                devices.append((ctx, device, state))
        structs = vcpu_state.structs_of(machine.kvm)
        msrs = machine.kvm.msr_index_list()
        vcpus = [vcpu_state.save_vcpu(v, structs, msrs) for v in machine.vcpus]
        vm = vcpu_state.save_vm(machine.vm)
        platform = {"reset_control": machine.pci.reset_control.save_state()}
        if machine.acpi is not None:
            platform["acpi"] = machine.acpi.save_state()
        writer.memory(machine.memory)
        manifest_devices, disks = [], []
        for ctx, _device, state in devices:
            kind = ctx.name.rsplit(".", 1)[0]
            dist, version = _plugin(machine, kind)
            manifest_devices.append({"name": ctx.name, "kind": kind, "distribution": dist,
                                     "version": version, "state_version": state.get("version")})
            disks += [dict(d, device=ctx.name) for d in disks_in(state)]
        disks += block_disks(machine)
        tsc_khz = machine.vm.tsc_khz() or (machine.vcpus[0].tsc_khz() if machine.vcpus else None)
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine_to_dict(machine.config),
            "cmdline": machine.cmdline,
            "memory": {"size": machine.memory.size},
            "cpu": {"vcpus": len(machine.vcpus), "tsc_khz": tsc_khz, "structs": list(structs),
                    "cpuid": vcpus[0]["cpuid"] if vcpus else []},
            "devices": manifest_devices,
            "disks": disks,
        }
        state = {"vm": vm, "vcpus": vcpus, "platform": platform,
                 "devices": [{"name": ctx.name, "state": s} for ctx, _d, s in devices]}
        writer.commit(manifest, state)
    on_disk = (path / "memory").stat().st_blocks * 512
    return {"path": str(path), "memory": machine.memory.size, "memory_on_disk": on_disk,
            "devices": [d["name"] for d in manifest_devices]}


# -- restoring -----------------------------------------------------------------------------
def check_snapshot(snap: Snapshot, *, force: bool = False) -> None:
    """What can be checked without KVM: the state's shape, the disks, the
    plugins' versions.  SnapshotError names what does not fit."""
    state, manifest, where = snap.state, snap.manifest, snap.path / "state.json"
    paths, counts = {}, {}
    for table in snap.config.devices:             # the disk each device uses now (--set may move it)
        index = counts.get(table.kind, 0)
        counts[table.kind] = index + 1
        if isinstance(table.values.get("path"), str):
            paths[f"{table.kind}.{index}"] = (table.base_dir / table.values["path"]).absolute()
    for disk in manifest.get("disks") or ():
        if not isinstance(disk, dict):
            raise SnapshotError(f"{snap.path / 'manifest.json'}: \"disks\" is malformed")
        _check_disk(disk, paths.get(disk.get("device")) or Path(str(disk.get("path"))), force)
    try:
        vcpu_state.check_vm(state.get("vm"))
        vcpus = state.get("vcpus")
        if not isinstance(vcpus, list) or len(vcpus) != snap.config.vcpus:
            raise vcpu_state.StateError(f"{snap.config.vcpus} vCPUs in the machine, "
                                        f"{len(vcpus) if isinstance(vcpus, list) else 'no'} saved")
        for i, v in enumerate(vcpus):
            vcpu_state.check_vcpu(v, i)
    except vcpu_state.StateError as e:
        raise SnapshotError(f"{where}: {e}") from None
    devices = manifest.get("devices")
    saved = state.get("devices")
    if not isinstance(devices, list) or not isinstance(saved, list) or len(devices) != len(saved) \
            or len(saved) != len(snap.config.devices):
        raise SnapshotError(f"{where}: the device states do not match the machine's "
                            f"{len(snap.config.devices)} devices")
    for d in devices:
        if not isinstance(d, dict) or not isinstance(d.get("kind"), str):
            raise SnapshotError(f"{snap.path / 'manifest.json'}: \"devices\" is malformed")
        try:
            version = importlib.metadata.version(d.get("distribution", "?"))
        except (importlib.metadata.PackageNotFoundError, ValueError):
            raise SnapshotError(f"device {d.get('name')}: its plugin {d.get('distribution')} "
                                f"{d.get('version')} is not installed") from None
        if version != d.get("version"):
            raise SnapshotError(f"device {d.get('name')}: the snapshot was taken with "
                                f"{d['distribution']} {d.get('version')}, {version} is installed: "
                                "restore with the version that took it")


def _check_disk(disk: dict, path: Path, force: bool) -> None:
    try:
        st = path.stat()
    except OSError as e:
        raise SnapshotError(f"device {disk.get('device')}: disk {path}: {e.strerror or e}") from None
    if st.st_size != disk.get("size") and not force:
        raise SnapshotError(
            f"device {disk.get('device')}: disk {path} is {st.st_size} bytes, it was "
            f"{disk.get('size')} at the snapshot: the guest's file systems would not match the "
            "disk (--force restores anyway)")


def check_host(machine, snap: Snapshot) -> None:
    """What needs this host's KVM: the CPU features the guest may use, the
    TSC rate, the vCPU structs."""
    supported = {(r[0], r[1]): r for r in machine.kvm.supported_cpuid()}
    saved = {(r[0], r[1]): r for r in snap.manifest.get("cpu", {}).get("cpuid") or
             snap.state["vcpus"][0]["cpuid"]}
    for leaf, sub, reg in FEATURE_WORDS:
        row = saved.get((leaf, sub))
        if row is None:
            continue
        have = supported.get((leaf, sub))
        missing = row[reg] & ~(have[reg] if have else 0) & ~NOT_FEATURES.get((leaf, sub, reg), 0)
        if missing:
            bit = (missing & -missing).bit_length() - 1
            raise SnapshotError(f"{snap.path}: the snapshot's CPU has CPUID {leaf:#x}.{sub} "
                                f"{REGISTERS[reg]} bit {bit}, which this host's CPU (or KVM) lacks: "
                                "restore it on a host with the same CPU")
    saved_khz = snap.manifest.get("cpu", {}).get("tsc_khz")
    host_khz = machine.vm.tsc_khz()
    if saved_khz and host_khz and abs(saved_khz - host_khz) > saved_khz * TSC_TOLERANCE:
        raise SnapshotError(f"{snap.path}: the snapshot's TSC runs at {saved_khz} kHz, this "
                            f"host's at {host_khz} kHz: the guest's clocks would run wrong")
    structs = vcpu_state.structs_of(machine.kvm)
    for name in ("xsave", "xcrs", "debugregs"):
        if name in snap.state["vcpus"][0] and name not in structs:
            raise SnapshotError(f"{snap.path}: the snapshot has {name} state and this host's KVM "
                                "cannot set it")


def restore(machine, snap: Snapshot) -> None:
    """Put the snapshot's KVM, platform and device state into ``machine``
    (built with the snapshot's memory, its devices created and vCPUs added)."""
    state = snap.state
    elapsed = vcpu_state.elapsed_ns(state["vm"])
    vcpu_state.restore_vm(machine.vm, state["vm"], elapsed)
    tsc_khz = snap.manifest.get("cpu", {}).get("tsc_khz") or 0
    advance = elapsed * tsc_khz // 1_000_000
    structs = vcpu_state.structs_of(machine.kvm)
    for vcpu, saved in zip(machine.vcpus, state["vcpus"]):
        refused = vcpu_state.restore_vcpu(vcpu, saved, structs, advance)
        if refused:
            log.warning("vCPU %d: KVM refused to set MSR(s) %s", vcpu.index,
                        ", ".join(f"{i:#x}" for i in refused))
    platform = state.get("platform", {})
    machine.pci.reset_control.restore_state(platform.get("reset_control", {"value": 0}))
    if machine.acpi is not None and "acpi" in platform:
        machine.acpi.restore_state(platform["acpi"], elapsed / 1e9)
    if machine.devices:
        from .device_state import restore_device
        for (ctx, device), saved in zip(machine.devices, state["devices"]):
            if not isinstance(saved, dict) or saved.get("name") != ctx.name:
                raise SnapshotError(f"the saved device {saved.get('name')} is {ctx.name} in "
                                    "this machine")
            restore_device(ctx, device, saved.get("state"))
    log.info("restored %s (saved %.1f s ago)", snap.path, elapsed / 1e9)
