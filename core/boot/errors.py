"""The one exception type that booting raises."""


class BootError(Exception):
    """A kernel, initrd or boot option that cannot be booted.

    The message is one line: which file, what is wrong, what would fix it.
    """
