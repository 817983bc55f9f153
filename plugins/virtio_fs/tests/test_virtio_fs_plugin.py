"""The virtio-fs plugin's wiring: keys, defaults, errors, entry point."""
import importlib.metadata
import tomllib
from pathlib import Path

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import config, plugin_manager
from kvmkit_virtio_fs.fs import VirtioFs
from kvmkit_virtio_fs.plugin import SPEC, default_tag, plugin

HERE = Path(__file__).parents[1]


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="virtio-fs", config=config(SPEC, **values), ctx=ctx)


def test_creates_a_virtio_device(device_context, tmp_path):
    (tmp_path / "my share").mkdir()
    dev = create(device_context, path=tmp_path / "my share", readonly=True, cache="never")
    try:
        assert device_context.virtio == [dev] and isinstance(dev, VirtioFs)
        assert dev.tag == "my_share" and dev.server.readonly and dev.server.cache == "never"
    finally:
        dev.close()


def test_explicit_tag_and_queues(device_context, tmp_path):
    dev = create(device_context, path=tmp_path, tag="root", request_queues=2)
    try:
        assert dev.tag == "root" and len(dev.queue_sizes) == 3
    finally:
        dev.close()


def test_path_must_be_a_directory(device_context, tmp_path):
    (tmp_path / "file").write_text("")
    for bad in (tmp_path / "file", tmp_path / "missing"):
        with pytest.raises(DeviceError, match="is not a directory"):
            create(device_context, path=bad)


@pytest.mark.parametrize("tag", ["", "t" * 37])
def test_bad_tag_is_a_device_error(device_context, tmp_path, tag):
    with pytest.raises(DeviceError, match="tag"):
        create(device_context, path=tmp_path, tag=tag)


def test_default_tag_of_a_long_name_is_unique_and_fits(tmp_path):
    a, b = tmp_path / ("x" * 50 + "a"), tmp_path / ("x" * 50 + "b")
    assert len(default_tag(a)) == 36 and default_tag(a) != default_tag(b)
    assert default_tag(Path("/")) == "root"


def test_readme_documents_every_key_and_the_threat_model():
    readme = (HERE / "README.md").read_text()
    assert all(f"`{k.name}`" in readme for k in SPEC.keys)
    assert "Threat model" in readme and "never" in readme and "always" in readme


def test_pyproject_entry_point():
    meta = tomllib.loads((HERE / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "kvmkit-virtio-fs"
    assert meta["project"]["entry-points"]["kvmkit.devices"] == {
        "virtio-fs": "kvmkit_virtio_fs.plugin:plugin"}


def test_installed_entry_point_loads_this_plugin():
    [ep] = [e for e in importlib.metadata.entry_points(group="kvmkit.devices")
            if e.name == "virtio-fs"]
    assert ep.load() is plugin
