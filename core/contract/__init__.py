"""The device-plugin contract: what every plugin in ``kvmkit.devices`` owes the core.

Chapters: :mod:`.kind` (loads, hooks, spec, keys, readme), :mod:`.device`
(the register and virtio fuzz), :mod:`.state` (snapshots); :mod:`.base`
finds what is under test.

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
            the same state and behaves the same (:mod:`kvmkit.contract.state`)
"""
from __future__ import annotations

# One module per chapter; imports run one way: this package's modules import
# .base and kvmkit.fakes, never kvmkit.testing or kvmkit.pytest_plugin.
from .base import (ContractFailure, ContractSetupError, KindUnderTest, distribution_readme,
                   kinds_of, project_distribution)
from .device import installed_queue_backends
from .kind import CHECKS, KindContract

__all__ = ["ContractFailure", "ContractSetupError", "KindUnderTest", "KindContract", "CHECKS",
           "project_distribution", "kinds_of", "distribution_readme", "installed_queue_backends"]
