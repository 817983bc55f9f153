import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from guest import kit  # noqa: E402

REQUIRE = os.environ.get("KVMKIT_REQUIRE_KVM") == "1"


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if REQUIRE:
        pytest.fail(f"{why} (KVMKIT_REQUIRE_KVM=1 makes this a failure)")
    pytest.skip(why)


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
