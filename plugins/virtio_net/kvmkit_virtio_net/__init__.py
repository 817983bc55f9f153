"""kvmkit device plugin: the ``virtio-net`` kind (user-mode networking or a tap)."""
