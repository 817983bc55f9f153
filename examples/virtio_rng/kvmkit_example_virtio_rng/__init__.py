"""Example kvmkit device plugin: a virtio entropy device (kind ``virtio-rng``)."""
from .rng import VirtioRng

__all__ = ["VirtioRng"]
