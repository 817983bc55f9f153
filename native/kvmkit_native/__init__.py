"""kvmkit's native queue backend: virtqueues, the virtio-blk data path and
virtio-net's transmit path to a tap, in C.

Registered in the entry-point group ``kvmkit.queues`` as ``native``; a
virtio device's ``queue`` key picks it (the default, "auto", does when this
distribution is installed).
"""
