"""kvmkit plugin: the ``virtio-fs`` device kind (a host directory in the guest)."""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from kvmkit.plugin_api import (QUEUE_KEY, DeviceConfig, DeviceContext, DeviceError, DevicePlugin,
                               DeviceSpec, Key)

from .fs import TAG_BYTES, VirtioFs
from .hostfs import raise_fd_limit
from .fuse_server import CACHE_MODES, FuseServer

KIND = "virtio-fs"

SPEC = DeviceSpec(
    kind=KIND,
    summary="virtio-fs: a host directory shared with the guest, served by a FUSE server in Python",
    keys=(
        Key("path", Path, doc="the host directory to share (the guest sees nothing outside it)"),
        Key("tag", str, None,
            f"mount tag the guest names (mount -t virtiofs TAG /mnt, or root=TAG "
            f"rootfstype=virtiofs), 1-{TAG_BYTES} bytes; default: derived from the "
            "directory's name"),
        Key("readonly", bool, False, "refuse every change to the shared tree (EROFS)"),
        Key("cache", str, "auto",
            "\"never\": the guest caches nothing (every access asks the host); \"auto\": "
            "1 s attribute/name timeouts, a file's cached data is dropped when its size or "
            "mtime changed; \"always\": 1 day timeouts and the page cache kept across opens "
            "(only for trees nothing else changes)", choices=CACHE_MODES),
        Key("xattr", bool, False, "serve extended attributes (the user.* namespace only)"),
        Key("request_queues", int, 1, "number of request queues", min=1, max=16),
        Key("max_inodes", int, 262144,
            "most host files the guest may know at once (each holds an O_PATH descriptor: "
            "kvmkit raises its open-file limit to fit)",
            min=16, max=1 << 22),
        Key("max_open_files", int, 4096, "most files and directories the guest may have open",
            min=16, max=1 << 20),
        QUEUE_KEY,
    ),
)

_TAG_CHARS = re.compile(r"[^A-Za-z0-9._+-]")


def default_tag(path: Path) -> str:
    """The directory's name (characters other than letters, digits and ._+-
    replaced by '_'); a name longer than 36 bytes keeps 27 of them, '~' and
    8 hex digits of a hash of the whole path."""
    name = _TAG_CHARS.sub("_", Path(path).resolve().name) or "root"
    if len(name) <= TAG_BYTES:
        return name
    digest = hashlib.sha256(os.fsencode(Path(path).resolve())).hexdigest()
    return f"{name[:TAG_BYTES - 9]}~{digest[:8]}"


def check_tag(tag: str) -> str:
    raw = tag.encode("utf-8")
    if not raw or len(raw) > TAG_BYTES or "\0" in tag:
        raise DeviceError(f"tag {tag!r} must be 1-{TAG_BYTES} bytes without NUL "
                          f"(it is {len(raw)})")
    return tag


def factory(config: DeviceConfig, ctx: DeviceContext) -> VirtioFs:
    # DeviceError messages name the key; the core prefixes the file and table.
    path = Path(config["path"])
    if not path.is_dir():
        raise DeviceError(f"path {str(path)!r} is not a directory "
                          "(virtio-fs shares a host directory)")
    tag = config["tag"]
    tag = default_tag(path) if tag is None else check_tag(tag)
    wanted = config["max_inodes"] + config["max_open_files"] + 1024
    try:
        got = raise_fd_limit(wanted)
    except (ValueError, OSError) as e:
        got = 0
        ctx.log.warning("%s: could not raise the open-file limit (%s)", ctx.name, e)
    if got < wanted:
        ctx.log.warning("%s: the open-file limit (%d) is below max_inodes + max_open_files: "
                        "the guest may see EMFILE before the tables are full (raise "
                        "`ulimit -n` or lower max_inodes)", ctx.name, got)
    try:
        server = FuseServer(path, readonly=config["readonly"], cache=config["cache"],
                            xattr=config["xattr"], max_inodes=config["max_inodes"],
                            max_handles=config["max_open_files"], log=ctx.log)
    except OSError as e:
        raise DeviceError(f"path {str(path)!r}: {e.strerror}") from None
    try:
        model = VirtioFs(server, tag, request_queues=config["request_queues"], log=ctx.log)
        ctx.add_virtio(model, queue=config["queue"])
    except BaseException:
        server.close()
        raise
    return model


plugin = DevicePlugin(SPEC, factory)
