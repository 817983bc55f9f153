"""kvmkit's native queue backend: virtqueues and the virtio-blk data path in C.

Registered in the entry-point group ``kvmkit.queues`` as ``native``; a
virtio device's ``queue`` key picks it (the default, "auto", does when this
distribution is installed).
"""
