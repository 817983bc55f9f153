"""`kvmkit snapshot NAME PATH` and `kvmkit run --restore PATH`.

A restored machine is the snapshot's machine: its memory, vCPUs and devices
cannot change.  What may: its name (--name, for a second copy running next to
the first), --detach, the watchdog (--stall-timeout), --host-quirks, and the
host side of a device with ``--set DEVICE.KEY=VALUE`` (DEVICE as `kvmkit
status` names it, e.g. serial8250.0; KEY one of OVERRIDABLE: where its
console goes, which copy of a disk image it uses, whether a virtio device's
queues run in Python or on the C engine: both save the same ring indices)."""
from __future__ import annotations

import os
import sys

OVERRIDABLE = ("backend", "path", "ifname", "forward", "queue")
# run flags a restored machine cannot take: (attribute, flag)
FIXED = (("machine", "a machine file"), ("kernel", "--kernel"), ("initrd", "--initrd"),
         ("append", "--append"), ("memory", "--memory"), ("vcpus", "--vcpus"), ("device", "--device"))


def _config_error(message: str):
    from .config import ConfigError
    return ConfigError(message)


def _refuse_fixed(args) -> None:
    for attr, flag in FIXED:
        if getattr(args, attr, None):
            raise _config_error(f"--restore: {flag} cannot be given: a restored machine has the "
                                "snapshot's kernel, memory, vCPUs and devices (it may change "
                                "--name, --detach, --stall-timeout, --host-quirks and --set)")
    if args.rw or args.rwdir or args.overlay_rwdir:
        raise _config_error("--restore: --rw, --rwdir and --overlay-rwdir are for the host-root guest")


def apply_sets(config, sets: list[str]):
    """``DEVICE.KEY=VALUE`` overrides applied to the snapshot's device tables."""
    import dataclasses

    from .machine_flags import _parse_value
    devices = list(config.devices)
    names, counts = {}, {}
    for i, table in enumerate(devices):
        index = counts.get(table.kind, 0)
        counts[table.kind] = index + 1
        names[f"{table.kind}.{index}"] = i
    for text in sets:
        target, sep, value = text.partition("=")
        device, dot, key = target.rpartition(".")
        if not sep or not dot or not device:
            raise _config_error(f"--set {text!r}: write DEVICE.KEY=VALUE, e.g. "
                                "--set serial8250.0.backend=file")
        if device not in names:
            raise _config_error(f"--set {text!r}: the snapshot has no device {device!r} "
                                f"(it has: {', '.join(names) or 'none'})")
        if key not in OVERRIDABLE:
            raise _config_error(f"--set {text!r}: {key!r} cannot change in a restored machine "
                                f"(only the host side can: {', '.join(OVERRIDABLE)})")
        i = names[device]
        values = dict(devices[i].values)
        parsed = _parse_value(value)
        if key in ("path",) and isinstance(parsed, str):      # relative to the working directory
            parsed = str(os.path.abspath(parsed))
        values[key] = parsed
        devices[i] = dataclasses.replace(devices[i], values=values)
    return dataclasses.replace(config, devices=tuple(devices))


def prepare_restore(args):
    """The snapshot ``--restore`` names with the flags applied, checked as far
    as it can be without KVM: (snapshot, config, plugin manager, checked machine)."""
    import dataclasses

    from .config import parse_name
    from .plugins import new_manager
    from .preflight import check_machine
    from .snapshot import check_snapshot
    from .snapshot_format import read
    _refuse_fixed(args)
    snap = read(args.restore)
    config = snap.config
    if args.name is not None:
        config = dataclasses.replace(config, name=parse_name(args.name, "--name"))
    if args.stall_timeout is not None:
        config = dataclasses.replace(config, stall_timeout=float(args.stall_timeout))
    if args.host_quirks is not None:
        config = dataclasses.replace(config, host_quirks=args.host_quirks)
    config = apply_sets(config, args.set)
    snap.config = config
    check_snapshot(snap, force=args.force)
    pm = new_manager()
    checked = check_machine(config, pm)
    return snap, config, pm, checked


def run_restore(args, run) -> int:
    """`kvmkit run --restore PATH`: ``run(config, ready, pm, checked, snapshot=...)``
    is cli._run.  Every check is made before a socket or a VM exists."""
    snap, config, pm, checked = prepare_restore(args)
    if args.detach:
        from .detach import run_detached
        return run_detached(config.name, lambda ready: run(config, ready, pm, checked, snapshot=snap))
    return run(config, None, pm, checked, snapshot=snap)


# -- kvmkit snapshot NAME PATH ---------------------------------------------------------------
SNAPSHOT_WAIT = 600.0              # seconds the client waits for the VM to write the snapshot


def cmd_snapshot(args) -> int:
    from .cli_control import _answer
    path = os.path.abspath(args.path)              # the VM may run in another directory
    result = _answer(args.name, "snapshot", SNAPSHOT_WAIT, path=path, resume=args.resume)
    print(f"kvmkit: {args.name}: snapshot {result['path']}: {result['memory'] >> 20} MiB of memory "
          f"({result['memory_on_disk'] >> 20} MiB on disk), {len(result['devices'])} device(s), "
          f"{result['seconds']:.2f} s; the VM is {'running' if args.resume else 'paused'}",
          file=sys.stdout)
    return 0


def add_command(sub) -> None:
    p = sub.add_parser("snapshot", help="save a running VM to a directory (then `kvmkit run --restore`)",
                       description="Pause the VM and write its memory, vCPU and device state to "
                       "directory PATH (which must not exist). The VM stays paused "
                       "(`kvmkit resume`, or --resume).")
    p.add_argument("name")
    p.add_argument("path")
    p.add_argument("--resume", action="store_true", help="let the VM run on once it is saved")
    p.set_defaults(func=cmd_snapshot)


def add_run_flags(run) -> None:
    run.add_argument("--restore", metavar="PATH",
                     help="go on from a snapshot (`kvmkit snapshot`) instead of booting")
    run.add_argument("--set", action="append", default=[], metavar="DEVICE.KEY=VALUE",
                     help="with --restore: change a device's host side (" + ", ".join(OVERRIDABLE) + ")")
    run.add_argument("--force", action="store_true",
                     help="with --restore: restore even if a disk image changed size since the snapshot")
