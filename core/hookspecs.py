"""The hooks a kvmkit plugin can implement (pluggy project "kvmkit").

Per-exit dispatch does not go through hooks: the buses own a sorted range
table that devices fill in at creation time.  Hooks decide *who* owns which
ranges (device enumeration), handle what no range claims, and mark the VM's
lifecycle.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("kvmkit")


@hookspec
def kvmkit_device_spec():
    """Return the :class:`~kvmkit.plugin_api.DeviceSpec` this plugin provides
    (or a list of them).  Called once when the plugin is loaded; the kinds it
    names are what the machine file may ask for."""


@hookspec(firstresult=True)
def kvmkit_create_device(kind, config, ctx):
    """Create the device ``kind`` from its validated ``config``
    (:class:`~kvmkit.plugin_api.DeviceConfig`).

    The device registers its I/O ranges and IRQ lines through ``ctx``
    (:class:`~kvmkit.plugin_api.DeviceContext`).  Return the device object,
    or ``None`` if this plugin does not provide ``kind``.  If the returned
    object has a ``close()`` method the core calls it once when the VM ends
    (also after a crash), and ``start()`` once before the first vCPU runs.
    Raise :class:`~kvmkit.plugin_api.DeviceError` for a configuration the
    host cannot honour (a missing file, a busy socket): its message is shown
    to the user as it is.

    ACPI: a device that the guest should find through ACPI gives the object
    an ``acpi_node(aml) -> bytes`` method.  When the machine has ACPI (the
    default; ``acpi = false`` in ``[machine]`` turns it off) the core calls
    it once after every device exists, with the core's AML encoder
    (``kvmkit.acpi.aml``: ``device``, ``name``, ``eisaid``,
    ``resource_template``, ``io``, ``irq_no_flags``, ``interrupt`` ...), and
    puts the returned AML (normally one ``Device``) into the DSDT's ``\\_SB``
    scope.  The serial8250 plugin returns a PNP0501 node, rtc a PNP0B00.
    """


@hookspec
def kvmkit_check_device(kind, config, devices, machine):
    """Check a device of ``kind`` before anything is created: what its
    validated ``config`` (:class:`~kvmkit.plugin_api.DeviceConfig`) asks of
    the host and of the other devices.  Return a list of problems (strings,
    one line each, saying what to fix; the core puts ``config.where`` in
    front), an empty list or ``None`` when there are none; ignore kinds this
    plugin does not provide.

    ``devices`` is every valid device of the machine in machine-file order
    (``config`` among them, compare with ``is``), so a plugin can find two of
    its devices that clash (report it on the later one only); ``machine`` is
    the machine configuration (``name``, ``memory``, ``vcpus``).  Look, do not
    take: open nothing you keep, lock nothing, create nothing.  ``kvmkit
    check`` and ``kvmkit run`` call it for every device and report every
    problem; a problem stops ``run`` before ``kvmkit_create_device``, which
    must still refuse what it cannot honour (the host may change in between).
    """


@hookspec
def kvmkit_kernel_cmdline(machine):
    """Return extra kernel command-line words (a string) that the devices of
    this plugin need, or ``None``.  ``machine`` is the validated machine
    configuration.  Words the user already wrote are not repeated."""


@hookspec(firstresult=True)
def kvmkit_unhandled_io(space, address, size, is_write, value):
    """An access no device range claims.  ``space`` is ``"pio"`` or
    ``"mmio"``.  Return an int (the value read; for writes anything not None)
    to claim it; return None to leave it to the core, which logs the first
    access per address and reads all-ones."""


@hookspec
def kvmkit_vm_started(vm):
    """All devices exist and the vCPUs are about to run."""


@hookspec
def kvmkit_vm_stopped(vm, reason, exit_code):
    """The vCPUs have stopped; devices are closed right after this."""
