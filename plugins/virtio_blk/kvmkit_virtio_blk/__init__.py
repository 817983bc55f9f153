"""kvmkit device plugin: virtio-blk on raw images and block devices."""
