"""``kvmkit sandbox`` and host-root ``kvmkit run``: boot a kernel on the
host's own files (virtio-fs, read-only) and run a command or a shell in it.

- :mod:`.kernels` finds the kernel as kvmtool does;
- :mod:`.guest_init` builds the guest's init (``init.c``, static) on first use;
- :mod:`.job` writes the job the init reads and reads back the status it reports;
- :mod:`.plan` turns the options into a machine: devices, command line, sizes.
"""
