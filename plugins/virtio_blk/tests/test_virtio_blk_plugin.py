"""The virtio-blk plugin: spec, entry point, factory through FakeContext."""
import importlib.metadata
from pathlib import Path

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import FakeContext, config, plugin_manager
from kvmkit_virtio_blk import protocol as p
from kvmkit_virtio_blk.blk import VirtioBlk
from kvmkit_virtio_blk.plugin import SPEC, default_serial, plugin


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="virtio-blk", config=config(SPEC, **values), ctx=ctx)


def test_spec_keys():
    keys = {k.name: k for k in SPEC.keys}
    assert list(keys) == ["path", "readonly", "serial", "cache", "discard", "poll_us", "queue"]
    assert keys["path"].type is Path and keys["path"].required
    assert (keys["readonly"].type, keys["readonly"].default) == (bool, False)
    assert (keys["serial"].type, keys["serial"].default) == (str, None)
    assert (keys["cache"].type, keys["cache"].default, keys["cache"].choices) == \
        (str, "writeback", ("writeback", "none"))
    assert (keys["discard"].type, keys["discard"].default) == (bool, True)
    assert (keys["poll_us"].type, keys["poll_us"].default, keys["poll_us"].min) == (int, 0, 0)
    assert all(k.doc for k in SPEC.keys)
    assert plugin.kvmkit_device_spec() is SPEC


def test_entry_point():
    eps = importlib.metadata.entry_points(group="kvmkit.devices")
    [ep] = [e for e in eps if e.name == "virtio-blk"]
    assert ep.value == "kvmkit_virtio_blk.plugin:plugin"
    assert ep.load() is plugin


def test_factory_hands_the_model_to_the_transport(image):
    path, _ = image
    with FakeContext() as ctx:
        dev = create(ctx, path=path)
        try:
            assert isinstance(dev, VirtioBlk)
            assert ctx.virtio == [dev]
            assert ctx.io == {"pio": [], "mmio": []}      # the transport owns the registers
            assert dev.serial == b"disk.img"
            assert not dev.readonly and dev.discard
            assert dev.backend.path == path and not dev.backend.direct
        finally:
            dev.close()


def test_factory_options(image):
    path, _ = image
    with FakeContext() as ctx:
        dev = create(ctx, path=path, readonly=True, serial="SN-42", discard=False)
        try:
            assert dev.serial == b"SN-42"
            assert dev.readonly and dev.features & (1 << p.F_RO)
            assert not dev.features & (1 << p.F_DISCARD)
        finally:
            dev.close()


def test_cache_none_opens_o_direct(direct_dir, make_image):
    path = direct_dir / "d.img"
    make_image(path, 1 << 20)
    with FakeContext() as ctx:
        dev = create(ctx, path=path, cache="none")
        try:
            assert dev.backend.direct
        finally:
            dev.close()


def test_a_second_vm_cannot_open_the_same_image(image):
    path, _ = image
    with FakeContext() as a, FakeContext() as b:
        dev = create(a, path=path)
        try:
            with pytest.raises(DeviceError, match=f"{path} is in use by another VM \\(locked\\)"):
                create(b, path=path)
            assert b.virtio == []
        finally:
            dev.close()
        create(b, path=path).close()                        # free again


@pytest.mark.parametrize("serial,message", [
    ("x" * 21, "at most 20"),
    ("dísk", "not ASCII"),
    ("a\0b", "NUL"),
])
def test_bad_serial(image, serial, message):
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match=message):
            create(ctx, path=image[0], serial=serial)
    create(FakeContext(), path=image[0]).close()            # nothing was left locked


def test_missing_image_names_the_path(tmp_path):
    path = tmp_path / "missing.img"
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match=str(path)):
            create(ctx, path=path)


def test_image_is_released_when_the_transport_refuses_the_device(image):
    class Refusing(FakeContext):
        def add_virtio(self, device, queue="auto"):
            raise DeviceError("no PCI slot left")

    with Refusing() as ctx:
        with pytest.raises(DeviceError, match="no PCI slot"):
            create(ctx, path=image[0])
    with FakeContext() as ctx:
        create(ctx, path=image[0]).close()


@pytest.mark.parametrize("name,serial", [
    ("disk.img", "disk.img"),
    ("exactly-twenty-chars", "exactly-twenty-chars"),
    ("my disk ü.raw", "my_disk__.raw"),
    ("a-rather-long-image-name-number-1.raw", None),
])
def test_default_serial(name, serial):
    got = default_serial(Path("/images") / name)
    assert len(got.encode("ascii")) <= 20
    if serial is not None:
        assert got == serial
    else:
        other = default_serial(Path("/images/a-rather-long-image-name-number-2.raw"))
        assert got != other and got.startswith("a-rather-lo~")
