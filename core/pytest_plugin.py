"""kvmkit's pytest plugin (loaded through :mod:`kvmkit.testing`, entry point
``pytest11``): fixtures for device tests and ``pytest --kvmkit-contract``.

Fixtures: ``guest_memory``, ``irq_line``, ``pio_bus``, ``mmio_bus``,
``device_context`` and ``virtqueue_driver``.

``pytest --kvmkit-contract`` adds the checks of :mod:`kvmkit.contract` for
every device kind of one distribution: the project whose pyproject.toml is
in (or above) the directory pytest runs in, or the one named
(``--kvmkit-contract=DIST``), or the project in a directory
(``--kvmkit-contract=path/to/project``).  Repeat the option for more.  The
checks carry the marker ``kvmkit_contract`` (``-m kvmkit_contract`` runs
only them).  A conftest.py feeds them through two hooks:

.. code-block:: python

    def pytest_kvmkit_contract_configs(kind, tmp_path):
        # example [[device]] tables; relative paths resolve against tmp_path
        if kind == "my-disk":
            (tmp_path / "disk.img").write_bytes(bytes(1 << 20))
            return [{"path": "disk.img"}, {"path": "disk.img", "readonly": True}]

    def pytest_kvmkit_contract_allowed_errors(kind):
        return (MyDocumentedError,)     # exceptions the device may raise on a bad access
"""
from __future__ import annotations

import tempfile
import zlib
from pathlib import Path

import pytest

from .bus import Bus
from .contract import (CHECKS, ContractFailure, ContractSetupError, KindContract, KindUnderTest,
                       distribution_readme, kinds_of, project_distribution)
from .fakes import FakeContext, FakeIrqLine
from .memory import GuestMemory
from .plugin_api import MMIO, PIO
from .virtio_test_driver import VirtioTestDriver

GUEST_MEMORY_SIZE = 4 << 20         # the guest_memory fixture's size
IRQ_LINE_GSI = 5                    # the irq_line fixture's GSI
MARKER = "kvmkit_contract"

_TARGETS = pytest.StashKey[list]()


class ContractHookSpecs:
    """Hooks a conftest.py implements to feed ``--kvmkit-contract``."""

    @pytest.hookspec(firstresult=True)
    def pytest_kvmkit_contract_configs(self, kind, tmp_path):
        """Example ``[[device]]`` tables (dicts, without ``kind``) for the
        device check of ``kind``; relative paths in them resolve against
        ``tmp_path``, where the hook may create files.  Return None to leave
        the kind to other conftests (and finally to its defaults)."""

    @pytest.hookspec
    def pytest_kvmkit_contract_allowed_errors(self, kind):
        """A tuple of exception types ``kind``'s device documents raising on
        a bad access; the register fuzz lets them pass."""


# -- fixtures ------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _kvmkit_logger_put_back():
    """``kvmkit.cli.main`` gives the "kvmkit" logger its own handler and stops
    propagation; a test that runs it in-process would hide every later test's
    log records from caplog.  Put the logger back after each test."""
    import logging
    logger = logging.getLogger("kvmkit")
    saved = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:], logger.propagate, logger.level = saved


@pytest.fixture
def guest_memory() -> GuestMemory:
    """4 MiB of zeroed guest RAM (a bytearray, no mmap)."""
    return GuestMemory(GUEST_MEMORY_SIZE, backing=bytearray(GUEST_MEMORY_SIZE))


@pytest.fixture
def irq_line():
    """A :class:`~kvmkit.testing.FakeIrqLine` (GSI 5) that records levels and pulses."""
    return FakeIrqLine(IRQ_LINE_GSI)


@pytest.fixture
def pio_bus() -> Bus:
    """The core's port-I/O bus (range table, overlap checks, all-ones for
    unclaimed reads, DeviceFault when a device raises)."""
    return Bus(PIO)


@pytest.fixture
def mmio_bus() -> Bus:
    """The core's MMIO bus."""
    return Bus(MMIO)


@pytest.fixture
def device_context(guest_memory, pio_bus, mmio_bus):
    """A :class:`~kvmkit.testing.FakeContext` named ``test.0`` on
    ``guest_memory`` whose ranges also go on ``pio_bus``/``mmio_bus``;
    closed after the test (which fails if a device thread is still running)."""
    ctx = FakeContext("test.0", memory=guest_memory, buses={PIO: pio_bus, MMIO: mmio_bus})
    yield ctx
    ctx.close()


@pytest.fixture
def virtqueue_driver(guest_memory):
    """``virtqueue_driver(device, **options)``: a
    :class:`~kvmkit.testing.VirtioTestDriver` playing the guest's driver for a
    VirtioDevice in ``guest_memory`` (options: features, event_idx, indirect,
    queue_sizes, lock)."""
    def make(device, **options) -> VirtioTestDriver:
        return VirtioTestDriver(device, options.pop("memory", guest_memory), **options)
    return make


# -- pytest --kvmkit-contract ----------------------------------------------------------------
def pytest_addoption(parser) -> None:
    group = parser.getgroup("kvmkit", "kvmkit device plugins")
    group.addoption("--kvmkit-contract", action="append", nargs="?", const="", default=None,
                    metavar="DIST", dest="kvmkit_contract",
                    help="run kvmkit's device-plugin contract against the kinds of DIST (a "
                    "distribution name or a project directory; default: the project whose "
                    "pyproject.toml is here or above)")


def pytest_addhooks(pluginmanager) -> None:
    pluginmanager.add_hookspecs(ContractHookSpecs)


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", f"{MARKER}: a check of kvmkit's device-plugin contract "
                                       "(pytest --kvmkit-contract)")
    values = config.getoption("kvmkit_contract", None)
    if values is None:
        return
    targets: list[KindUnderTest] = []
    here = Path(config.invocation_params.dir)
    for value in values:
        name = _resolve(value, here)
        try:
            found = kinds_of(name)
        except ContractSetupError as e:
            raise pytest.UsageError(f"--kvmkit-contract: {e}") from None
        targets.extend(t for t in found if t not in targets)
    config.stash[_TARGETS] = targets


def _resolve(value: str, here: Path) -> str:
    """A distribution name from an option value ('' = the project here)."""
    directory = here if value == "" else (here / value if (here / value).is_dir() else None)
    if directory is None:
        return value
    found = project_distribution(directory.resolve())
    if found is None:
        raise pytest.UsageError(f"--kvmkit-contract: no pyproject.toml with a [project] name in "
                                f"{directory} or above: name the distribution "
                                "(--kvmkit-contract=DIST)")
    return found[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    targets = config.stash.get(_TARGETS, None)
    if not targets:
        return
    by_dist: dict[str, list[KindUnderTest]] = {}
    for t in targets:
        by_dist.setdefault(t.distribution, []).append(t)
    for dist, kinds in by_dist.items():
        name = f"kvmkit-contract[{dist}]"
        collector = ContractCollector.from_parent(session, name=name, nodeid=name, targets=kinds)
        items.extend(collector.collect())


class ContractCollector(pytest.Collector):
    def __init__(self, *, targets: list[KindUnderTest], **kwargs):
        super().__init__(**kwargs)
        self.targets = targets

    def collect(self):
        for target in self.targets:
            contract = KindContract(target)
            for check in CHECKS:
                yield ContractItem.from_parent(self, name=f"{check}[{target.kind}]",
                                               contract=contract, check=check)


class ContractItem(pytest.Item):
    def __init__(self, *, contract: KindContract, check: str, **kwargs):
        super().__init__(**kwargs)
        self.contract = contract
        self.check = check
        self.add_marker(MARKER)

    def runtest(self) -> None:
        contract, kind = self.contract, self.contract.kind
        if self.check == "readme":
            contract.check_readme(distribution_readme(contract.target.distribution))
        elif self.check in ("device", "state"):
            hook = self.config.hook
            with tempfile.TemporaryDirectory(prefix="kvmkit-contract-") as tmp:
                tmp_path = Path(tmp)
                configs = hook.pytest_kvmkit_contract_configs(kind=kind, tmp_path=tmp_path)
                if self.check == "state":
                    contract.check_state(configs, tmp_path, seed=zlib.crc32(kind.encode()))
                    return
                allowed = tuple(e for result in hook.pytest_kvmkit_contract_allowed_errors(kind=kind)
                                for e in (result or ()))
                contract.check_device(configs, tmp_path, allowed_errors=allowed,
                                      seed=zlib.crc32(kind.encode()))
        else:
            getattr(contract, f"check_{self.check}")()

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ContractFailure):
            return f"kvmkit contract: {excinfo.value}"
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"kvmkit contract: {self.contract.kind}: {self.check}"
