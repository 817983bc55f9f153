"""kvmkit plugin: the ``virtio-blk`` device kind (a raw disk image on virtio)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kvmkit.plugin_api import (QUEUE_KEY, DeviceConfig, DeviceContext, DeviceError, DevicePlugin,
                               DeviceSpec, Key)

from .backend import FileBackend
from .blk import VirtioBlk
from .protocol import ID_BYTES

KIND = "virtio-blk"

SPEC = DeviceSpec(
    kind=KIND,
    summary="virtio block device on a raw disk image or block device",
    keys=(
        Key("path", Path, doc="raw disk image (size a multiple of 512) or block device"),
        Key("readonly", bool, False,
            "expose the disk read-only (a file the VMM cannot write is read-only anyway)"),
        Key("serial", str, None,
            f"serial number the guest reads (GET_ID), at most {ID_BYTES} ASCII characters; "
            "default: derived from the file name"),
        Key("cache", str, "writeback",
            "\"writeback\": through the host page cache, FLUSH is fdatasync; "
            "\"none\": O_DIRECT, bypassing the host page cache",
            choices=("writeback", "none")),
        Key("discard", bool, True,
            "offer DISCARD and WRITE_ZEROES (hole punching) to the guest"),
        Key("poll_us", int, 0,
            "native queue engine only: after serving a batch, watch the queue this many "
            "microseconds for the next requests before sleeping (adaptive polling: no kick, no "
            "thread wake-up; costs host CPU while it watches); 0: off",
            min=0, max=1_000_000),
        QUEUE_KEY,
    ),
)

_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def default_serial(path: Path) -> str:
    """The file name as printable ASCII, or, if longer than 20 characters, its
    first 11 characters, '~' and 8 hex digits of a hash of the whole name (so
    two long names with a common prefix still differ)."""
    name = _PRINTABLE.sub("_", Path(path).name) or "disk"
    if len(name) <= ID_BYTES:
        return name
    digest = hashlib.sha256(Path(path).name.encode("utf-8", "surrogateescape")).hexdigest()
    return f"{name[:ID_BYTES - 9]}~{digest[:8]}"


def check_serial(serial: str, where: str) -> str:
    try:
        raw = serial.encode("ascii")
    except UnicodeEncodeError:
        raise DeviceError(f"{where}: serial {serial!r} is not ASCII") from None
    if len(raw) > ID_BYTES:
        raise DeviceError(f"{where}: serial {serial!r} is {len(raw)} bytes; at most {ID_BYTES}")
    if "\0" in serial:
        raise DeviceError(f"{where}: serial {serial!r} contains a NUL byte")
    return serial


def _same_image(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return Path(a) == Path(b)
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check(config: DeviceConfig, devices) -> list[str]:
    """``kvmkit_check_device``: the serial, the image (opened read-only and
    closed again: it exists, is usable, and no VM holds it for writing) and an
    image that an earlier disk of this machine also uses."""
    problems = []
    path = Path(config["path"])
    if config["serial"] is not None:
        try:
            check_serial(config["serial"], "")
        except DeviceError as e:
            problems.append(str(e).removeprefix(": "))
    try:
        FileBackend(path, readonly=True, direct=config["cache"] == "none").close()
    except DeviceError as e:
        problems.append(f"path: {e}")
    for other in devices:
        if other is config:
            break
        if other.kind == KIND and _same_image(other["path"], path) and not (
                other["readonly"] and config["readonly"]):
            problems.append(f"path: {path} is also the image of {other.table}; two disks can share "
                            "an image only when both are readonly = true")
    return problems


def factory(config: DeviceConfig, ctx: DeviceContext) -> VirtioBlk:
    """Open and lock the image, build the model and hand it to the virtio transport."""
    where = config.where or ctx.name
    path = Path(config["path"])
    serial = config["serial"]
    serial = default_serial(path) if serial is None else check_serial(serial, where)
    backend = FileBackend(path, readonly=config["readonly"], direct=config["cache"] == "none")
    try:
        if backend.forced_readonly:
            ctx.log.warning("%s: %s is not writable; the guest sees a read-only disk",
                            ctx.name, path)
        model = VirtioBlk(backend, serial=serial, discard=config["discard"], log=ctx.log,
                          poll_us=config["poll_us"])
        ctx.add_virtio(model, queue=config["queue"])
    except BaseException:
        backend.close()
        raise
    return model


plugin = DevicePlugin(SPEC, factory, check)
