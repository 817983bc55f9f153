"""kvmkit device plugin: a virtio console (kind ``virtio-console``)."""
from .console import VirtioConsole

__all__ = ["VirtioConsole"]
