"""kvmkit plugin: the ``virtio-rng`` device kind.

The thin layer between the core and :class:`~.rng.VirtioRng`: the kind's
keys, and a factory that builds the model and hands it to the core's
virtio-pci transport, which gives it a PCI function, interrupts and a
worker thread.
"""
from __future__ import annotations

from kvmkit.plugin_api import QUEUE_KEY, DeviceConfig, DeviceContext, DevicePlugin, DeviceSpec, Key

from .rng import VirtioRng

KIND = "virtio-rng"

SPEC = DeviceSpec(
    kind=KIND,
    summary="virtio entropy device: random bytes from the host's getrandom()",
    keys=(
        Key("max_bytes_per_request", int, 4096,
            "most random bytes one guest request gets (a larger buffer is filled only this far)",
            min=1, max=1 << 20),
        QUEUE_KEY,
    ),
)


def create(config: DeviceConfig, ctx: DeviceContext) -> VirtioRng:
    model = VirtioRng(max_bytes=config["max_bytes_per_request"], log=ctx.log)
    ctx.add_virtio(model, queue=config["queue"])
    return model


plugin = DevicePlugin(SPEC, create)
