"""Test helpers for device plugin authors (``kvmkit.testing``), and kvmkit's
pytest plugin (entry point ``pytest11``, so installed with the core).

Drive a device without a VM: create it with a :class:`FakeContext`, reach its
registers with :func:`pio` / :func:`mmio`, and look at its interrupt lines
(:class:`FakeIrqLine`) and stop requests afterwards.

.. code-block:: python

    from kvmkit.testing import FakeContext, pio

    def test_reads_back(tmp_path):
        with FakeContext() as ctx:
            dev = plugin.kvmkit_create_device(kind="rtc", config=cfg, ctx=ctx)   # plugin: a DevicePlugin
            pio(ctx, 0x70, value=0x0E)
            pio(ctx, 0x71, value=0x42)
            assert pio(ctx, 0x71) == 0x42

As a pytest plugin it brings the fixtures ``guest_memory``, ``irq_line``,
``pio_bus``, ``mmio_bus``, ``device_context`` and ``virtqueue_driver``, and
``pytest --kvmkit-contract``, the contract suite a plugin distribution runs
against itself (see :mod:`kvmkit.pytest_plugin` and :mod:`kvmkit.contract`).
"""
from __future__ import annotations

# Imports run one way: this facade -> the pytest plugin -> the contract -> the
# fakes (kvmkit.fakes), which import none of them.
from .fakes import FakeContext, FakeIrqLine, config, mmio, pio, plugin_manager

__all__ = ["FakeIrqLine", "FakeContext", "pio", "mmio", "config", "plugin_manager",
           "VirtioTestDriver", "EngineHost", "ContractFailure", "KindContract",
           "FakeMachine", "PciVirtioDriver", "descriptors_exhausted"]

# A machine without KVM under the core's real device context, virtio-pci
# transport and BAR mapping, and a virtio-pci driver for it (snapshot tests):
# imported on first use.
_LAZY = {"FakeMachine": "kvmkit.fake_machine", "PciVirtioDriver": "kvmkit.virtio.pci_test_driver",
         "descriptors_exhausted": "kvmkit.fd_exhaustion"}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(module), name)


# -- the pytest plugin: fixtures, --kvmkit-contract, its hooks --------------------------
from .contract import ContractFailure, KindContract  # noqa: E402
from .virtio.engine_host import EngineHost  # noqa: E402
from .virtio_test_driver import VirtioTestDriver  # noqa: E402

try:                                    # the helpers above work without pytest too
    import pytest as _pytest  # noqa: F401
except ImportError:                     # pragma: no cover - only where pytest is absent
    pass
else:
    from .pytest_plugin import (_kvmkit_logger_put_back, device_context,  # noqa: E402,F401
                                guest_memory, irq_line,
                                mmio_bus, pio_bus, pytest_addhooks, pytest_addoption,
                                pytest_collection_modifyitems, pytest_configure,
                                virtqueue_driver)
