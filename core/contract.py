"""The device-plugin contract: what every plugin in ``kvmkit.devices`` owes the core.

``pytest --kvmkit-contract`` runs these checks against the kinds of one
distribution (see :mod:`kvmkit.testing`); tests may call them directly.
Each check raises :class:`ContractFailure` whose message says what is wrong
and what would fix it.

Per kind:

``loads``   the entry point imports and names an object
``hooks``   the object is a valid pluggy plugin against kvmkit's hook specs
            (``check_pending``), with ``kvmkit_device_spec`` and
            ``kvmkit_create_device``
``spec``    ``kvmkit_device_spec`` returns a DeviceSpec whose kind is the
            entry-point name, with a one-line summary
``keys``    every Key has a usable name, a supported type, a doc string, a
            default of its type inside its choices and limits
``readme``  the distribution's README (its long description) names the kind
            and every key, when it ships one
``device``  created from example tables (or its defaults) against a
            FakeContext it registers an I/O range, a PCI function or a virtio device,
            survives a fuzz of random register reads and writes (and, for a
            virtio device, of its configuration space and of garbage rings)
            raising nothing but what it documents, and after ``close()``
            leaves no thread running
``state``   saved mid-operation and restored into a fresh instance, it saves
            the same state and behaves the same (:mod:`kvmkit.contract_state`)
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import random
import re
import struct
import threading
import time
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any, Iterable, Mapping

import pluggy

from .config import ConfigError, DeviceTable, validate_device
from .plugin_api import MMIO, PIO, DeviceSpec, Key, Size, VirtioDevice, VirtqueueError
from .plugins import DEVICE_GROUP, new_manager
from .virtio.device import (VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_RING_INDIRECT_DESC,
                            VIRTIO_F_VERSION_1)
from .virtio.queue import MAX_QUEUE_SIZE, avail_ring_size, desc_table_size, used_ring_size

__all__ = ["ContractFailure", "ContractSetupError", "KindUnderTest", "KindContract", "CHECKS",
           "project_distribution", "kinds_of", "distribution_readme"]

CHECKS = ("loads", "hooks", "spec", "keys", "readme", "device", "state")
SUPPORTED_TYPES = (int, bool, str, float, Path, Size, list)
KEY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

FUZZ_ACCESSES = 2000            # register accesses per registered range
FUZZ_SECONDS = 2.0              # ... or this long, whichever ends first
VIRTIO_ROUNDS = 12              # garbage ring layouts per virtio device
ENGINE_SETTLE_S = 0.05          # per queue and round: how long a backend's engine is served
CONFIG_ACCESSES = 200           # virtio configuration-space accesses
THREAD_GRACE_S = 2.0            # how long close() may take to end the device's threads
MEMORY_SIZE = 4 << 20           # guest memory of the contract's FakeContext


class ContractFailure(AssertionError):
    """A plugin breaks the contract; the message says how to fix it."""


class ContractSetupError(Exception):
    """The contract cannot run (no such distribution, no kinds in it)."""


@dataclasses.dataclass(frozen=True)
class KindUnderTest:
    kind: str
    entry_point: importlib.metadata.EntryPoint
    distribution: str


# -- what is under test ----------------------------------------------------------------------
def project_distribution(start: Path) -> tuple[str, Path] | None:
    """``(name, pyproject path)`` of the nearest pyproject.toml at or above
    ``start`` that has a ``[project] name``."""
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            try:
                name = tomllib.loads(candidate.read_text()).get("project", {}).get("name")
            except (OSError, tomllib.TOMLDecodeError):
                name = None
            if isinstance(name, str) and name:
                return name, candidate
    return None


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def kinds_of(distribution: str) -> list[KindUnderTest]:
    """The device kinds an installed distribution provides."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ContractSetupError(f"distribution {distribution!r} is not installed: install it "
                                 "first (pip install -e .)") from None
    name = dist.metadata["Name"] or distribution
    eps = [ep for ep in dist.entry_points if ep.group == DEVICE_GROUP]
    if not eps:
        raise ContractSetupError(f"distribution {name!r} declares no entry points in "
                                 f"{DEVICE_GROUP!r}: add [project.entry-points.\"{DEVICE_GROUP}\"] "
                                 "to its pyproject.toml and reinstall it")
    return [KindUnderTest(ep.name, ep, name) for ep in sorted(eps, key=lambda e: e.name)]


def distribution_readme(distribution: str) -> str | None:
    """The README a distribution ships (its long description), if any.  For
    an editable install, the project's README file as it is now (the
    installed copy is only refreshed by reinstalling)."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    source = _editable_readme(dist)
    if source is not None:
        return source
    meta = dist.metadata
    text = meta.get_payload() or meta.get("Description") or ""
    return text if text.strip() else None


def _editable_readme(dist) -> str | None:
    """The README file of the project an editable (or in-tree egg-info)
    distribution comes from."""
    candidates = []
    try:
        origin = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        origin = {}
    url = origin.get("url", "")
    if origin.get("dir_info", {}).get("editable") and url.startswith("file://"):
        candidates.append(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)))
    candidates.append(Path(str(dist.locate_file(""))))        # an in-tree *.egg-info's folder
    for project in candidates:
        try:
            meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
        except (OSError, KeyError, tomllib.TOMLDecodeError, UnicodeDecodeError):
            continue
        if _normalise(str(meta.get("name", ""))) != _normalise(dist.metadata["Name"] or ""):
            continue
        readme = meta.get("readme")
        if isinstance(readme, dict):
            readme = readme.get("file")
        try:
            return (project / readme).read_text() if isinstance(readme, str) else None
        except (OSError, UnicodeDecodeError):
            return None
    return None


# -- the checks ------------------------------------------------------------------------------
class KindContract:
    """The contract checks for one kind; each ``check_*`` raises ContractFailure."""

    def __init__(self, target: KindUnderTest):
        self.target = target
        self.kind = target.kind
        self._plugin: Any = None
        self._loaded = False

    def __repr__(self) -> str:
        return f"KindContract({self.kind!r} from {self.target.distribution})"

    # -- shared steps (each failure names the step that broke) ------------------------------
    def plugin(self) -> Any:
        if not self._loaded:
            try:
                self._plugin = self.target.entry_point.load()
            except Exception as e:
                raise ContractFailure(f"{self.kind}: entry point {self.target.entry_point.value!r} "
                                      f"does not load: {type(e).__name__}: {e}") from e
            self._loaded = True
        return self._plugin

    def manager(self) -> pluggy.PluginManager:
        """A plugin manager with kvmkit's hook specs and this plugin, checked."""
        plugin = self.plugin()
        pm = new_manager()
        try:
            pm.register(plugin, name=f"{DEVICE_GROUP}:{self.kind}")
        except (pluggy.PluginValidationError, ValueError) as e:
            raise ContractFailure(f"{self.kind}: not a valid kvmkit plugin: {e}") from None
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as e:
            raise ContractFailure(f"{self.kind}: implements a hook kvmkit does not have "
                                  f"(check the name against kvmkit.hookspecs): {e}") from None
        return pm

    def spec(self) -> DeviceSpec:
        pm = self.manager()
        specs = []
        for impl in pm.hook.kvmkit_device_spec.get_hookimpls():
            try:
                result = impl.function()
            except Exception as e:
                raise ContractFailure(f"{self.kind}: kvmkit_device_spec raised "
                                      f"{type(e).__name__}: {e}") from e
            specs.extend(result if isinstance(result, (list, tuple)) else [result])
        bad = [s for s in specs if not isinstance(s, DeviceSpec)]
        if bad:
            raise ContractFailure(f"{self.kind}: kvmkit_device_spec returned {bad[0]!r}; return a "
                                  "kvmkit.plugin_api.DeviceSpec (or a list of them)")
        mine = [s for s in specs if s.kind == self.kind]
        if not mine:
            kinds = ", ".join(repr(s.kind) for s in specs) or "none"
            raise ContractFailure(f"{self.kind}: kvmkit_device_spec declares kinds {kinds} but not "
                                  f"{self.kind!r}, the entry-point name: the two must be equal")
        return mine[0]

    # -- loads, hooks, spec ------------------------------------------------------------------
    def check_loads(self) -> None:
        if self.plugin() is None:
            raise ContractFailure(f"{self.kind}: entry point {self.target.entry_point.value!r} "
                                  "names None")

    def check_hooks(self) -> None:
        pm = self.manager()
        for hook in ("kvmkit_device_spec", "kvmkit_create_device"):
            if not getattr(pm.hook, hook).get_hookimpls():
                raise ContractFailure(f"{self.kind}: implements no {hook} hook; a device plugin "
                                      "needs kvmkit_device_spec and kvmkit_create_device "
                                      "(DevicePlugin(spec, factory) has both)")

    def check_spec(self) -> None:
        spec = self.spec()
        if not isinstance(spec.summary, str) or not spec.summary.strip():
            raise ContractFailure(f"{self.kind}: the DeviceSpec has no summary; give a one-line "
                                  "description (kvmkit plugins shows it)")
        if "\n" in spec.summary.strip():
            raise ContractFailure(f"{self.kind}: the summary is more than one line")
        if not isinstance(spec.keys, tuple) or not all(isinstance(k, Key) for k in spec.keys):
            raise ContractFailure(f"{self.kind}: DeviceSpec.keys must be a tuple of "
                                  "kvmkit.plugin_api.Key")

    # -- keys -----------------------------------------------------------------------------------
    def check_keys(self) -> None:
        spec = self.spec()
        seen: set[str] = set()
        for key in spec.keys:
            where = f"{self.kind}: key {key.name!r}"
            if not isinstance(key.name, str) or not KEY_NAME.match(key.name):
                raise ContractFailure(f"{where}: not a usable TOML key name (letters, digits, "
                                      "'_' and '-', not starting with a digit)")
            if key.name == "kind":
                raise ContractFailure(f"{where}: 'kind' is the machine file's, not a device key")
            if key.name in seen:
                raise ContractFailure(f"{where}: declared twice")
            seen.add(key.name)
            if not any(key.type is t for t in SUPPORTED_TYPES):
                raise ContractFailure(f"{where}: type {key.type!r} is not one the core validates "
                                      "(int, bool, str, float, Path, Size, list)")
            if not isinstance(key.doc, str) or not key.doc.strip():
                raise ContractFailure(f"{where}: no doc string; say what it does and, for an "
                                      "optional key, what its absence means")
            self._check_default(key, where)

    def _check_default(self, key: Key, where: str) -> None:
        if key.choices is not None:
            if not isinstance(key.choices, (tuple, list)) or not key.choices:
                raise ContractFailure(f"{where}: choices must be a non-empty tuple")
            for choice in key.choices:
                if not _has_type(choice, key.type):
                    raise ContractFailure(f"{where}: choice {choice!r} is not a {key.type_name}")
        if key.min is not None and key.max is not None and key.min > key.max:
            raise ContractFailure(f"{where}: min {key.min} is above max {key.max}")
        if key.required or key.default is None:
            return
        default = key.default
        if not _has_type(default, key.type):
            raise ContractFailure(f"{where}: default {default!r} is not a {key.type_name}")
        if key.choices is not None and default not in key.choices:
            raise ContractFailure(f"{where}: default {default!r} is not one of its choices "
                                  f"{tuple(key.choices)!r}")
        value = Size.parse(default) if key.type is Size else default
        if key.min is not None and value < key.min:
            raise ContractFailure(f"{where}: default {default!r} is below its min {key.min}")
        if key.max is not None and value > key.max:
            raise ContractFailure(f"{where}: default {default!r} is above its max {key.max}")

    # -- readme ---------------------------------------------------------------------------------
    def check_readme(self, readme: str | None) -> None:
        """``readme`` is the distribution's README text (None: it ships none)."""
        if readme is None:
            return
        spec = self.spec()
        missing = [name for name in (self.kind, *(k.name for k in spec.keys))
                   if not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", readme)]
        if missing:
            raise ContractFailure(f"{self.kind}: the README of {self.target.distribution} does not "
                                  f"mention {', '.join(repr(m) for m in missing)}: document the kind "
                                  "and every key (name, type, default, meaning)")

    # -- the device --------------------------------------------------------------------------
    def check_device(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path, *,
                     allowed_errors: tuple[type[BaseException], ...] = (), seed: int = 0,
                     accesses: int = FUZZ_ACCESSES, virtio_rounds: int = VIRTIO_ROUNDS,
                     thread_grace: float = THREAD_GRACE_S) -> None:
        """Create, start, fuzz and close the device once per example table in
        ``configs`` (relative paths resolve against ``base_dir``); with no
        tables, once with the defaults."""
        pm = self.manager()
        for n, (label, config) in enumerate(self.configs(configs, base_dir)):
            _DeviceRun(self, pm, config, label, allowed_errors, random.Random(seed + n),
                       accesses, virtio_rounds, thread_grace).run()

    def check_state(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path, *,
                    seed: int = 0) -> None:
        """The device's state for snapshots (kvmkit.contract_state): once per
        example table (and queue backend), saved mid-operation and restored
        into a fresh instance, it saves the same state again and behaves the
        same."""
        from .contract_state import StateRun
        pm = self.manager()
        for n, (label, config) in enumerate(self.configs(configs, base_dir)):
            StateRun(self, pm, config, label, random.Random(seed + n)).run()

    def configs(self, configs: Iterable[Mapping[str, Any]] | None, base_dir: Path) -> list:
        """(label, validated DeviceConfig) per example table; a virtio kind's
        tables once per installed queue backend; no tables: the defaults."""
        spec = self.spec()
        tables = [dict(c) for c in configs] if configs else []
        if not tables:
            required = [k.name for k in spec.keys if k.required]
            if required:
                raise ContractFailure(
                    f"{self.kind}: key(s) {', '.join(required)} are required, so the contract "
                    "cannot create the device from its defaults: return example tables from the "
                    "pytest hook pytest_kvmkit_contract_configs(kind, tmp_path) in conftest.py")
            tables = [{}]
        if spec.key("queue") is not None:      # a virtio kind: every installed queue backend
            tables = [t if "queue" in t else {**t, "queue": q}
                      for t in tables for q in installed_queue_backends()]
        out = []
        for n, raw in enumerate(tables):
            label = f"{self.kind} with {raw}" if raw else f"{self.kind} with its defaults"
            table = DeviceTable(self.kind, raw, f"contract table {n} ({self.kind})", base_dir)
            try:
                config = validate_device(table, spec)
            except ConfigError as e:
                raise ContractFailure(f"example table {n} does not validate: {e}") from None
            out.append((label, config))
        return out


def installed_queue_backends() -> list[str]:
    """"python", and "native" when kvmkit-native is installed and loads."""
    from .virtio.backends import BackendError, resolve
    names = ["python"]
    try:
        resolve("native", "contract")
        names.append("native")
    except BackendError:
        pass
    return names


def _has_type(value: Any, t: type) -> bool:
    if t is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if t is int:
        return isinstance(value, int)
    if t is float:
        return isinstance(value, (int, float))
    if t is str:
        return isinstance(value, str)
    if t is Path:
        return isinstance(value, (str, Path))
    if t is Size:
        try:
            Size.parse(value)
        except ValueError:
            return False
        return True
    if t is list:
        return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
    return False


class _DeviceRun:
    """One device's life under the contract: create, start, fuzz, close."""

    def __init__(self, contract: KindContract, pm, config, label: str, allowed, rng: random.Random,
                 accesses: int, virtio_rounds: int, thread_grace: float):
        self.contract, self.pm, self.config, self.label = contract, pm, config, label
        self.allowed = tuple(allowed)
        self.rng = rng
        self.accesses = accesses
        self.virtio_rounds = virtio_rounds
        self.thread_grace = thread_grace

    def fail(self, message: str, cause: BaseException | None = None) -> ContractFailure:
        error = ContractFailure(f"{self.label}: {message}")
        error.__cause__ = cause
        return error

    def run(self) -> None:
        from .testing import FakeContext          # testing imports this module for its plugin
        kind = self.contract.kind
        before = set(threading.enumerate())
        ctx = FakeContext(f"{kind}.0", machine_name="contract", memory_size=MEMORY_SIZE,
                          join_timeout=self.thread_grace)
        try:
            device = self.pm.hook.kvmkit_create_device(kind=kind, config=self.config, ctx=ctx)
        except Exception as e:
            ctx.stopping.set()
            raise self.fail(f"kvmkit_create_device raised {type(e).__name__}: {e}", e) from e
        failure: BaseException | None = None
        try:
            self._exercise(ctx, device)
        except BaseException as e:
            failure = e
        problems = self._close(ctx, device, before)
        if failure is not None:
            raise failure
        if problems:
            raise self.fail("; ".join(problems))

    def _exercise(self, ctx, device) -> None:
        if device is None:
            raise self.fail(f"kvmkit_create_device returned None for its own kind {self.contract.kind!r}")
        ranges = ctx.io[PIO] + ctx.io[MMIO]
        functions = list(getattr(ctx, "pci", ()))          # (config space, {bar: handler})
        if not ranges and not ctx.virtio and not functions:
            raise self.fail("the device registered no I/O range (ctx.add_io), no virtio device "
                            "(ctx.add_virtio) and no PCI function: the guest could never reach it")
        start = getattr(device, "start", None)
        if callable(start):
            try:
                start()
            except Exception as e:
                raise self.fail(f"start() raised {type(e).__name__}: {e}", e) from e
        for space in (PIO, MMIO):
            for base, size, handler in list(ctx.io[space]):
                self._fuzz_range(ctx, space, base, size, handler)
        for config, bars in functions:
            for index, handler in bars.items():
                bar = config.bar(index)
                self._fuzz_range(ctx, MMIO if bar.is_memory else PIO, bar.address, bar.size, handler,
                                 f"BAR{index} ")
        for model, backend in zip(list(ctx.virtio), list(ctx.queue_backends)):
            self._fuzz_virtio(ctx, model, backend)

    # -- registers ---------------------------------------------------------------------------
    def _fuzz_range(self, ctx, space: str, base: int, size: int, handler, what_range: str = "") -> None:
        rng = self.rng
        widths = [w for w in ((1, 2, 4) if space == PIO else (1, 2, 4, 8)) if w <= size] or [size]
        deadline = time.monotonic() + FUZZ_SECONDS
        for i in range(self.accesses):
            width = rng.choice(widths)
            offset = rng.randrange(0, size - width + 1)
            is_write = rng.random() < 0.5
            value = rng.getrandbits(8 * width)
            what = (f"{'write of ' + hex(value) + ' to' if is_write else 'read of'} {what_range}"
                    f"{space} {base + offset:#x} (size {width})")
            try:
                with ctx.lock:
                    if is_write:
                        handler.write(offset, width, value)
                    else:
                        got = handler.read(offset, width)
            except self.allowed:
                continue
            except Exception as e:
                raise self.fail(f"{what} raised {type(e).__name__}: {e} (access {i} of the register "
                                "fuzz); in a VM this stops the guest: answer bad accesses as "
                                "hardware would", e) from e
            if not is_write and (isinstance(got, bool) or not isinstance(got, int)):
                raise self.fail(f"{what} returned {got!r}, not an int")
            if time.monotonic() > deadline:
                break

    # -- virtio -------------------------------------------------------------------------------
    def _fuzz_virtio(self, ctx, model, backend) -> None:
        if not isinstance(model, VirtioDevice):
            raise self.fail(f"ctx.add_virtio got {model!r}, not a kvmkit.plugin_api.VirtioDevice")
        sizes = list(model.queue_sizes)
        if not isinstance(model.device_id, int) or model.device_id <= 0:
            raise self.fail(f"device_id {model.device_id!r} is not a virtio device type (> 0)")
        if not sizes or any(not 1 <= s <= MAX_QUEUE_SIZE or s & (s - 1) for s in sizes):
            raise self.fail(f"queue_sizes {sizes!r}: need at least one queue, each a power of two "
                            f"up to {MAX_QUEUE_SIZE}")
        if not 0 <= model.pci_class <= 0xFFFFFF:
            raise self.fail(f"pci_class {model.pci_class:#x} is not a 24-bit class code")
        rng = self.rng
        length = len(model.config_bytes())
        for _ in range(CONFIG_ACCESSES):
            offset, width = rng.randrange(0, length + 16), rng.choice((1, 2, 4, 8))
            value = rng.getrandbits(8 * width)
            self._virtio_call(ctx, f"config_write({offset}, {width}, {value:#x})",
                              model.config_write, offset, width, value)
            got = self._virtio_call(ctx, f"config_read({offset}, {width})",
                                    model.config_read, offset, width)
            if got is not None and (isinstance(got, bool) or not isinstance(got, int)):
                raise self.fail(f"config_read({offset}, {width}) returned {got!r}, not an int")
        memory = ctx.memory
        for round_ in range(self.virtio_rounds):
            features = model.features | (1 << VIRTIO_F_VERSION_1)
            event_idx, indirect = rng.random() < 0.5, rng.random() < 0.5
            features |= (1 << VIRTIO_F_RING_EVENT_IDX if event_idx else 0)
            features |= (1 << VIRTIO_F_RING_INDIRECT_DESC if indirect else 0)
            queues = _garbage_queues(memory, rng, sizes, event_idx, indirect, backend.split_queue)
            self._virtio_call(ctx, "activate()", model.activate, queues, features)
            engines = getattr(getattr(model, "host", None), "engines", {})
            for index in range(len(sizes)):
                if index in engines:             # the backend's engine serves it on its thread
                    self._drive_engine(ctx, model.host, engines[index], index, round_)
                    continue
                self._virtio_call(ctx, f"process({index}) on garbage rings (round {round_})",
                                  model.process, index, queue_error_ok=True)
            self._virtio_call(ctx, "reset()", model.reset)

    def _drive_engine(self, ctx, host, engine, index: int, round_: int) -> None:
        """Kick a queue a backend's engine runs, and serve what it hands back
        to Python until it goes quiet (a short while: the rings are garbage)."""
        import select
        host.kick()
        deadline = time.monotonic() + ENGINE_SETTLE_S
        while time.monotonic() < deadline:
            if select.select([engine.event_fd], [], [], 0.01)[0]:
                self._virtio_call(ctx, f"the {index} engine's service() on garbage rings "
                                  f"(round {round_})", engine.service, queue_error_ok=True)

    def _virtio_call(self, ctx, what: str, method, *args, queue_error_ok: bool = False):
        try:
            with ctx.lock:
                return method(*args)
        except VirtqueueError:
            if queue_error_ok:               # documented: the transport sets DEVICE_NEEDS_RESET
                return None
            raise
        except self.allowed:
            return None
        except Exception as e:
            raise self.fail(f"virtio {what} raised {type(e).__name__}: {e}; only VirtqueueError may "
                            "leave process() (the transport then resets the device)", e) from e

    # -- the end ----------------------------------------------------------------------------
    def _close(self, ctx, device, before: set) -> list[str]:
        problems = []
        ctx.stopping.set()                     # as the VMM does before closing devices
        close = getattr(device, "close", None)
        if callable(close):
            try:
                close()
            except Exception as e:
                problems.append(f"close() raised {type(e).__name__}: {e}")
        try:
            ctx.close()
        except RuntimeError as e:
            cause = e.__cause__
            problems.append(f"{e}{f': {type(cause).__name__}: {cause}' if cause else ''}")
        deadline = time.monotonic() + self.thread_grace
        while True:
            leaked = [t for t in threading.enumerate() if t not in before and t.is_alive()]
            if not leaked or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if leaked:
            problems.append("threads still running after close(): "
                            + ", ".join(t.name for t in leaked)
                            + " (start threads with ctx.spawn and end them when ctx.stopping is set)")
        return problems


_DESC = struct.Struct("<QIHH")
_NEXT, _WRITE, _INDIRECT = 1, 2, 4


def _garbage_queues(memory, rng: random.Random, sizes: list[int], event_idx: bool,
                    indirect: bool, split_queue) -> list:
    """Queues of the given sizes (made by a backend's ``split_queue``) holding
    chains a careless or hostile driver could write: mostly well-formed chains
    over buffers of random bytes, with a few fields (address, length, flags,
    next, avail.idx, heads) replaced by hostile values."""
    layouts, at = [], 0x1000
    for size in sizes:
        desc = at
        avail = desc + desc_table_size(size)
        used = -(-(avail + avail_ring_size(size)) // 4) * 4
        at = -(-(used + used_ring_size(size)) // 4096) * 4096
        layouts.append((size, desc, avail, used))
    data_start = at
    memory.write(data_start, rng.randbytes(min(memory.size - data_start, 1 << 20)))
    queues = []
    for size, desc, avail, used in layouts:
        table = [[rng.getrandbits(64), rng.getrandbits(32), rng.getrandbits(16),
                  rng.getrandbits(16)] for _ in range(size)]
        free = list(range(size))
        rng.shuffle(free)
        heads = []
        while free:
            n = min(rng.choice((1, 1, 2, 2, 3, 4)), len(free))
            chain = [free.pop() for _ in range(n)]
            readable = rng.randrange(0, n + 1)          # device-readable ones come first
            for j, i in enumerate(chain):
                length = rng.choice((1, 2, 16, 512, 4096, rng.randrange(1, 8192)))
                addr = rng.randrange(data_start, memory.size - length)
                flags = (_NEXT if j < n - 1 else 0) | (_WRITE if j >= readable else 0)
                table[i] = [addr, length, flags, chain[j + 1] if j < n - 1 else 0]
            heads.append(chain[0])
        ring_idx = len(heads)
        for _ in range(rng.choice((0, 0, 1, 3))):       # hostile touches
            i, what = rng.randrange(size), rng.randrange(6)
            if what == 0:
                table[i][0] = rng.getrandbits(64)
            elif what == 1:
                table[i][1] = rng.choice((0, rng.getrandbits(32)))
            elif what == 2:
                table[i][2] = rng.choice((_INDIRECT, _INDIRECT | _NEXT, _NEXT, rng.getrandbits(16)))
            elif what == 3:
                table[i][3] = rng.choice((i, rng.randrange(size + 4)))
            elif what == 4:
                ring_idx = rng.getrandbits(16)
            else:
                heads[rng.randrange(len(heads))] = rng.randrange(size + 4)
        memory.write(desc, b"".join(_DESC.pack(a, n & 0xFFFFFFFF, f & 0xFFFF, x & 0xFFFF)
                                    for a, n, f, x in table))
        slots = heads + [rng.randrange(size + 4) for _ in range(size - len(heads))]
        ring = struct.pack(f"<HH{size}HH", 0, ring_idx & 0xFFFF, *slots, rng.getrandbits(16))
        memory.write(avail, ring)
        memory.write(used, bytes(used_ring_size(size)))
        queues.append(split_queue(memory, size, desc, avail, used, event_idx=event_idx,
                                  indirect=indirect))
    return queues
