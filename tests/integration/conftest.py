import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from guest import kit  # noqa: E402

from requirement import need as _need  # noqa: E402


@pytest.fixture(scope="session")
def guest_kit():
    _need(os.access("/dev/kvm", os.R_OK | os.W_OK), "/dev/kvm is not usable here")
    k = kit()
    _need(bool(k) and all(p and p.exists() for p in k.values()),
          "the guest kit is not built: run guest/build-kit")
    return k


@pytest.fixture(scope="session")
def on_pvm_host():
    from kvmkit.hypervisor import host_quirks
    return host_quirks.detect()
