"""kvmkit plugin: virtio-fs (kind ``virtio-fs``) and its stand-alone FUSE server.

``FuseServer`` (fuse_server) serves a host directory over the FUSE protocol;
``FuseMount`` (fuse_dev) serves it to the host kernel through /dev/fuse;
``VirtioFs`` (fs) is the virtio device; ``plugin`` (plugin) the entry point.
"""
from .fuse_dev import FuseMount, MountError
from .fuse_server import CACHE_MODES, FuseServer

__all__ = ["FuseServer", "FuseMount", "MountError", "CACHE_MODES"]
