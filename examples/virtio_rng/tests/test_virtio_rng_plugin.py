"""The virtio-rng plugin's wiring, through kvmkit.testing's device_context."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from kvmkit.testing import config, plugin_manager
from kvmkit_example_virtio_rng.plugin import SPEC, plugin
from kvmkit_example_virtio_rng.rng import VirtioRng

HERE = Path(__file__).parents[1]


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="virtio-rng", config=config(SPEC, **values), ctx=ctx)


def test_spec():
    key, queue = SPEC.keys
    assert (SPEC.kind, key.name, key.type, key.default) == ("virtio-rng", "max_bytes_per_request", int, 4096)
    assert (queue.name, queue.default) == ("queue", "auto")


def test_creates_a_virtio_device_and_no_io_ranges(device_context):
    dev = create(device_context, max_bytes_per_request=32)
    assert device_context.virtio == [dev]
    assert isinstance(dev, VirtioRng) and dev.max_bytes == 32
    assert device_context.io == {"pio": [], "mmio": []}


def test_the_model_runs_on_the_context_memory(device_context, virtqueue_driver):
    dev = create(device_context, max_bytes_per_request=8)
    drv = virtqueue_driver(dev, lock=device_context.lock)
    written, data = drv.request(0, writable=[16])
    assert written == 8 and len(data) == 8


def test_other_kinds_are_not_ours(device_context):
    assert plugin.kvmkit_create_device(kind="virtio-blk", config=config(SPEC), ctx=device_context) is None


def test_close_logs_what_it_served(device_context, virtqueue_driver):
    dev = create(device_context)
    assert dev.log is device_context.log                  # the device logs under its instance name
    virtqueue_driver(dev).request(0, writable=[10])
    lines = []

    class Log:
        def info(self, message, *args):
            lines.append(message % args)

    dev.log = Log()
    dev.close()
    assert lines == ["served 1 requests, 10 bytes"]


def test_readme_documents_every_key():
    readme = (HERE / "README.md").read_text()
    assert all(f"`{k.name}`" in readme for k in SPEC.keys)


def test_pyproject_entry_point():
    meta = tomllib.loads((HERE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-example-virtio-rng"
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {
        "virtio-rng": "kvmkit_example_virtio_rng.plugin:plugin"}


def test_installed_entry_point_loads_this_plugin():
    try:
        importlib.metadata.distribution("kvmkit-example-virtio-rng")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("kvmkit-example-virtio-rng is not installed")
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices") if e.name == "virtio-rng"]
    assert ep.load() is plugin
