"""kvmkit plugin: virtio-fs (kind ``virtio-fs``) and its stand-alone FUSE server."""
