"""Finding queue backends (entry-point group kvmkit.queues) and picking one."""
import importlib.metadata

import pytest

from kvmkit.virtio import backends
from kvmkit.virtio.backends import PYTHON, BackendError, resolve
from kvmkit.virtio.queue import SplitQueue


class FakeEntryPoint:
    def __init__(self, name, obj=None, error=None):
        self.name, self.value, self._obj, self._error = name, f"fake:{name}", obj, error
        self.dist = None

    def load(self):
        if self._error:
            raise self._error
        return self._obj


@pytest.fixture
def entry_points(monkeypatch):
    """entry_points(**name_to_ep): what the group holds for this test."""
    def set_(**eps):
        monkeypatch.setattr(backends, "_entry_points", lambda: dict(eps))
        monkeypatch.setattr(backends, "_loaded", {})
    return set_


def test_the_core_registers_the_python_backend():
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group=backends.QUEUE_GROUP)}
    assert eps["python"].load() is PYTHON
    assert eps["python"].dist.name == "kvmkit"


def test_python_backend_builds_split_queues():
    from kvmkit.memory import GuestMemory
    mem = GuestMemory(1 << 20, backing=bytearray(1 << 20))
    q = PYTHON.split_queue(mem, 16, 0x1000, 0x2000, 0x3000, event_idx=True, indirect=False)
    assert isinstance(q, SplitQueue) and q.size == 16 and q.event_idx


def test_auto_prefers_native(entry_points):
    native = object()
    entry_points(python=FakeEntryPoint("python", PYTHON), native=FakeEntryPoint("native", native))
    assert resolve("auto", "disk") is native
    assert resolve("python", "disk") is PYTHON


def test_auto_without_native_is_python(entry_points):
    entry_points(python=FakeEntryPoint("python", PYTHON))
    assert resolve("auto", "disk") is PYTHON


def test_auto_with_a_broken_native_warns_and_uses_python(entry_points, caplog):
    entry_points(native=FakeEntryPoint("native", error=ImportError("undefined symbol kvq_pop")))
    assert resolve("auto", "disk0") is PYTHON
    assert "disk0: queue backend 'native'" in caplog.text and "undefined symbol" in caplog.text


def test_native_asked_for_but_not_installed(entry_points):
    entry_points(python=FakeEntryPoint("python", PYTHON))
    with pytest.raises(BackendError, match=r'disk0: queue = "native", but .* not installed; '
                                           r'pip install \./native'):
        resolve("native", "disk0")


def test_native_asked_for_but_broken_names_the_error(entry_points):
    entry_points(native=FakeEntryPoint("native", error=OSError("bad ELF")))
    with pytest.raises(BackendError, match="disk0: queue backend 'native' .* failed to load: "
                                           "OSError: bad ELF; reinstall it"):
        resolve("native", "disk0")


def test_unknown_backend_lists_the_installed_ones(entry_points):
    entry_points(python=FakeEntryPoint("python", PYTHON), native=FakeEntryPoint("native", object()))
    with pytest.raises(BackendError, match=r"queue = 'fast' is not an installed queue backend "
                                           r"\(installed: native, python"):
        resolve("fast", "disk0")
