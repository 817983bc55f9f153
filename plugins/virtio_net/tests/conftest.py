"""Fixtures of the virtio-net tests; the driver model is in netdriver.py."""
import pytest

from kvmkit_virtio_net.net import VirtioNet
from netdriver import MAC, FakeBackend, NetDriver


@pytest.fixture
def make_net():
    """make_net(offloads=0, rx_checksums_valid=False, mtu=1500, **driver_kw) -> (driver, dev, backend)."""
    def make(offloads: int = 0, rx_checksums_valid: bool = False, mtu: int = 1500,
             features: int | None = None, **kw):
        backend = FakeBackend(offloads, rx_checksums_valid)
        dev = VirtioNet(backend, mac=MAC, mtu=mtu)
        return NetDriver(dev, features=features, **kw), dev, backend
    return make


def pytest_kvmkit_contract_configs(kind, tmp_path):
    if kind != "virtio-net":
        return None
    return [{}, {"mtu": 9000, "mac": "52:54:00:12:34:56"}]
