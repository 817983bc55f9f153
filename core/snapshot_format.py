"""The snapshot directory: what is in it, writing it whole or not at all,
and reading it back with every check done before anything starts.

    PATH/manifest.json   format and kvmkit version, the machine as resolved,
                         CPU (TSC rate, vCPU 0's CPUID), each device's kind,
                         plugin distribution and version and state version,
                         the disks the device states name, and the size and
                         SHA-256 of state.json
    PATH/state.json      the VM's and each vCPU's KVM state, the platform's
                         (ACPI registers, reset control), each device's state
    PATH/memory          guest RAM, byte for byte (sparse: zero chunks are holes)

A snapshot is written into ``PATH.tmp-<pid>`` and renamed to PATH when it
is complete, so PATH either is a whole snapshot or does not exist.  The files
are made read-only: VMs restored from it map ``memory`` copy-on-write and
see any later change to the file in the pages they have not written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

from . import __version__
from .config import DeviceTable, KernelConfig, MachineConfig

FORMAT = "kvmkit-snapshot"
FORMAT_VERSION = 1
MANIFEST, STATE, MEMORY = "manifest.json", "state.json", "memory"
MAX_JSON = 256 << 20             # bytes: a manifest or state bigger than this is not ours


class SnapshotError(Exception):
    """A snapshot cannot be written or read (one line: the file and what is wrong)."""


# -- the machine as resolved <-> JSON ----------------------------------------------------
def machine_to_dict(config: MachineConfig) -> dict:
    """The resolved machine: every key with its value, paths absolute."""
    k = config.kernel
    return {
        "name": config.name, "memory": config.memory, "vcpus": config.vcpus,
        "host_quirks": config.host_quirks, "acpi": config.acpi, "stall_timeout": config.stall_timeout,
        "source": str(config.source) if config.source else None,
        "kernel": {"image": str(k.image) if k.image else None,
                   "initrd": str(k.initrd) if k.initrd else None, "cmdline": k.cmdline},
        "devices": [{"kind": d.kind, "values": dict(d.values), "where": d.where,
                     "base_dir": str(d.base_dir)} for d in config.devices],
    }


def machine_from_dict(data, where: str) -> MachineConfig:
    """The MachineConfig a manifest's "machine" describes (its kernel is not
    needed again: memory holds the running kernel)."""
    try:
        devices = tuple(DeviceTable(d["kind"], dict(d["values"]), d["where"], Path(d["base_dir"]))
                        for d in data["devices"])
        config = MachineConfig(
            name=data["name"], memory=data["memory"], vcpus=data["vcpus"],
            kernel=KernelConfig(None, None, data["kernel"]["cmdline"]), devices=devices,
            host_quirks=data["host_quirks"], source=Path(data["source"]) if data["source"] else None,
            acpi=data["acpi"], stall_timeout=float(data["stall_timeout"]))
    except (KeyError, TypeError, ValueError) as e:
        raise SnapshotError(f"{where}: \"machine\" is malformed ({type(e).__name__}: {e})") from None
    for key, kind in (("name", str), ("memory", int), ("vcpus", int), ("acpi", bool)):
        if type(getattr(config, key)) is not kind:
            raise SnapshotError(f"{where}: \"machine\" {key} is not a {kind.__name__}")
    if config.memory <= 0 or config.memory % 4096 or config.vcpus < 1:
        raise SnapshotError(f"{where}: \"machine\" has {config.memory} bytes and {config.vcpus} vCPUs")
    return config


def with_overrides(config: MachineConfig, name: str | None) -> MachineConfig:
    return dataclasses.replace(config, name=name) if name else config


# -- writing -------------------------------------------------------------------------------
def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Writer:
    """Builds a snapshot in a temporary directory next to ``path``;
    ``commit()`` renames it into place, ``abort()`` (or an exception in a
    ``with`` block) removes it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if self.path.exists() or self.path.is_symlink():
            raise SnapshotError(f"{self.path}: already exists; give a new path (or remove it)")
        if not self.path.parent.is_dir():
            raise SnapshotError(f"{self.path}: its directory {self.path.parent} does not exist")
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        try:
            self.tmp.mkdir(mode=0o700)
        except OSError as e:
            raise SnapshotError(f"{self.tmp}: cannot create it: {e.strerror or e}") from None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None:
            self.abort()

    def memory(self, memory) -> None:
        fd = os.open(self.tmp / MEMORY, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            memory.save(fd)
            os.fsync(fd)
        finally:
            os.close(fd)

    def commit(self, manifest: dict, state: dict) -> None:
        """Write state.json and the manifest that vouches for it, then rename."""
        try:
            state_bytes = json.dumps(state, separators=(",", ":")).encode()
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"the machine state is not JSON-able: {e}") from None
        manifest = dict(manifest, format=FORMAT, format_version=FORMAT_VERSION,
                        kvmkit_version=__version__,
                        files={STATE: {"size": len(state_bytes), "sha256": _digest(state_bytes)}})
        for name, data in ((STATE, state_bytes), (MANIFEST, json.dumps(manifest, indent=1).encode())):
            with open(self.tmp / name, "xb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for name in (STATE, MANIFEST, MEMORY):
            os.chmod(self.tmp / name, 0o400)
        os.chmod(self.tmp, 0o755)
        try:
            os.rename(self.tmp, self.path)        # fails if path appeared meanwhile
        except OSError as e:
            raise SnapshotError(f"{self.path}: cannot put the snapshot there: {e.strerror or e}") from None
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


# -- reading -------------------------------------------------------------------------------
@dataclasses.dataclass
class Snapshot:
    path: Path
    manifest: dict
    state: dict
    config: MachineConfig

    @property
    def memory_path(self) -> Path:
        return self.path / MEMORY


def _read_json(path: Path, what: str, limit: int = MAX_JSON) -> tuple[bytes, object]:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise SnapshotError(f"{path}: missing: not a kvmkit snapshot, or an incomplete copy "
                            f"of one") from None
    except OSError as e:
        raise SnapshotError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if len(data) > limit:
        raise SnapshotError(f"{path}: over {limit >> 20} MiB: not a kvmkit {what}")
    try:
        return data, json.loads(data)
    except (ValueError, RecursionError):
        raise SnapshotError(f"{path}: not valid JSON (truncated or not a kvmkit {what})") from None


def read(path) -> Snapshot:
    """Read and check a snapshot directory; SnapshotError says what is wrong
    (missing, truncated, foreign, another version, memory of the wrong size)."""
    path = Path(path)
    if not path.is_dir():
        raise SnapshotError(f"{path}: {'not a directory' if path.exists() else 'does not exist'}: "
                            "give the directory `kvmkit snapshot` wrote")
    where = str(path / MANIFEST)
    _raw, manifest = _read_json(path / MANIFEST, "snapshot manifest", 16 << 20)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{where}: not a kvmkit snapshot manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{where}: snapshot format version {manifest.get('format_version')!r}; "
                            f"this kvmkit reads version {FORMAT_VERSION}")
    if manifest.get("kvmkit_version") != __version__:
        raise SnapshotError(f"{where}: written by kvmkit {manifest.get('kvmkit_version')}, this is "
                            f"kvmkit {__version__}: restore it with the kvmkit that wrote it")
    config = machine_from_dict(manifest.get("machine"), where)
    files = manifest.get("files")
    expect = files.get(STATE) if isinstance(files, dict) else None
    if not isinstance(expect, dict):
        raise SnapshotError(f"{where}: \"files\" does not describe {STATE}")
    data, state = _read_json(path / STATE, "snapshot state")
    if len(data) != expect.get("size") or _digest(data) != expect.get("sha256"):
        raise SnapshotError(f"{path / STATE}: {len(data)} bytes that do not match the manifest "
                            f"(it says {expect.get('size')}): truncated or changed")
    if not isinstance(state, dict):
        raise SnapshotError(f"{path / STATE}: not a snapshot state")
    memory = path / MEMORY
    try:
        size = memory.stat().st_size
    except OSError as e:
        raise SnapshotError(f"{memory}: {e.strerror or e}: the snapshot has no guest memory") from None
    if size != config.memory:
        raise SnapshotError(f"{memory}: {size} bytes, the snapshot's guest has {config.memory}: "
                            "truncated or not this snapshot's memory")
    return Snapshot(path, manifest, state, config)
