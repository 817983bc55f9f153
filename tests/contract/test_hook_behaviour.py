"""Each hook of core/hookspecs.py, called the way the core calls it (no KVM):
plugins from throwaway distributions, loaded through the entry points."""
from pathlib import Path

import pytest

from kvmkit.config import ConfigError, ConfigErrors, machine_from_dict
from kvmkit.machine import Machine
from kvmkit.plugins import load_kinds, new_manager
from kvmkit.preflight import check_machine

TWO_KINDS = """
from kvmkit.plugin_api import hookimpl, DeviceSpec, Key

@hookimpl
def kvmkit_device_spec():
    return [DeviceSpec("alpha", "first", (Key("n", int, 1, "a number"),)),
            DeviceSpec("beta", "second")]

@hookimpl
def kvmkit_create_device(kind, config, ctx):
    if kind in ("alpha", "beta"):
        return ("two-kinds", kind, dict(config))
"""

OTHER = """
from kvmkit.plugin_api import hookimpl, DeviceSpec

@hookimpl
def kvmkit_device_spec():
    return DeviceSpec("gamma", "third")

@hookimpl
def kvmkit_create_device(kind, config, ctx):
    return ("other", kind) if kind == "gamma" else None
"""

EXTRAS = """
from kvmkit.plugin_api import hookimpl, DeviceSpec
CALLS = []

@hookimpl
def kvmkit_device_spec():
    return DeviceSpec("extras", "cmdline, unclaimed I/O and lifecycle hooks")

@hookimpl
def kvmkit_create_device(kind, config, ctx):
    return object() if kind == "extras" else None

@hookimpl
def kvmkit_kernel_cmdline(machine):
    return "console=ttyS1 extras.on=1 " + machine.name

@hookimpl
def kvmkit_unhandled_io(space, address, size, is_write, value):
    CALLS.append((space, address, size, is_write, value))
    if space == "pio" and address == 0x80:
        return 0x5A
    return None

@hookimpl
def kvmkit_vm_started(vm):
    CALLS.append(("started", vm.config.name))
    vm.request_stop("stopped by the extras plugin", 7)

@hookimpl
def kvmkit_vm_stopped(vm, reason, exit_code):
    CALLS.append(("stopped", reason, exit_code))
"""


CHECKED = """
from kvmkit.plugin_api import hookimpl, DeviceSpec, Key
CREATED = []

@hookimpl
def kvmkit_device_spec():
    return DeviceSpec("lonely", "one per machine", (Key("n", int, 1, "a number"),))

@hookimpl
def kvmkit_check_device(kind, config, devices, machine):
    if kind != "lonely":
        return None
    problems = [f"n = {config['n']} is odd"] if config["n"] % 2 else []
    earlier = [d for d in devices[:devices.index(config)] if d.kind == kind]
    if earlier:
        problems.append(f"{machine.name} already has {earlier[0].table}")
    return problems

@hookimpl
def kvmkit_create_device(kind, config, ctx):
    CREATED.append(kind)
    return object() if kind == "lonely" else None
"""


def machine_with(tmp_path, kinds, cmdline="console=ttyS0"):
    data = {"machine": {"name": "hooks"}, "kernel": {"image": "vmlinux", "cmdline": cmdline},
            "device": [{"kind": k} for k in kinds]}
    return machine_from_dict(data, source=None, base_dir=Path(tmp_path))


def test_kvmkit_device_spec_may_name_several_kinds(throwaway_dist):
    throwaway_dist("kvmkit-two", {"two_kinds": TWO_KINDS}, {"alpha": "two_kinds", "beta": "two_kinds"})
    pm = new_manager()
    loaded = load_kinds(pm, ["alpha", "beta"])
    assert [s.kind for s in pm.hook.kvmkit_device_spec()[0]] == ["alpha", "beta"]
    assert loaded["alpha"].spec.key("n").default == 1 and loaded["beta"].spec.keys == ()
    assert loaded["alpha"].plugin is loaded["beta"].plugin         # registered once


def test_kvmkit_create_device_first_result_wins(throwaway_dist):
    throwaway_dist("kvmkit-two", {"two_kinds": TWO_KINDS, "other_kind": OTHER},
                   {"alpha": "two_kinds", "gamma": "other_kind"})
    pm = new_manager()
    load_kinds(pm, ["alpha", "gamma"])
    assert pm.hook.kvmkit_create_device(kind="gamma", config={}, ctx=None) == ("other", "gamma")
    assert pm.hook.kvmkit_create_device(kind="alpha", config={"n": 2}, ctx=None) == \
        ("two-kinds", "alpha", {"n": 2})
    assert pm.hook.kvmkit_create_device(kind="delta", config={}, ctx=None) is None


@pytest.fixture
def extras(throwaway_dist, tmp_path):
    throwaway_dist("kvmkit-extras", {"extras_plugin": EXTRAS}, {"extras": "extras_plugin"})
    pm = new_manager()
    load_kinds(pm, ["extras"])
    import extras_plugin
    extras_plugin.CALLS.clear()
    return Machine(machine_with(tmp_path, ["extras"]), pm), extras_plugin.CALLS


def test_kvmkit_kernel_cmdline_adds_words_the_user_did_not_write(extras):
    machine, _ = extras
    # the core calls the hook with the validated machine; console= was the user's
    assert machine.pm.hook.kvmkit_kernel_cmdline(machine=machine.config) == [
        "console=ttyS1 extras.on=1 hooks"]
    assert machine._cmdline() == "console=ttyS0 extras.on=1 hooks"


def test_kvmkit_unhandled_io_claims_and_declines(extras):
    machine, calls = extras
    assert machine.pio.read(0x80, 1) == 0x5A                  # claimed by the plugin
    assert machine.pio.read(0x81, 2) == 0xFFFF                 # declined: all-ones
    machine.mmio.write(0xFED0_0000, 4, 0x1234)
    assert calls == [("pio", 0x80, 1, False, 0), ("pio", 0x81, 2, False, 0),
                     ("mmio", 0xFED0_0000, 4, True, 0x1234)]


def test_kvmkit_vm_started_and_kvmkit_vm_stopped_bracket_the_run(extras):
    machine, calls = extras
    stop = machine.run()                                       # no vCPUs: the hooks alone
    assert (stop.reason, stop.code) == ("stopped by the extras plugin", 7)
    assert calls == [("started", "hooks"), ("stopped", "stopped by the extras plugin", 7)]


def test_kvmkit_check_device_problems_are_all_reported(throwaway_dist, tmp_path):
    from fake_kernels import elf_kernel
    elf_kernel(tmp_path / "vmlinux")
    throwaway_dist("kvmkit-lonely", {"lonely_plugin": CHECKED}, {"lonely": "lonely_plugin"})
    data = {"machine": {"name": "hooks"}, "kernel": {"image": "vmlinux"},
            "device": [{"kind": "lonely", "n": 2}, {"kind": "lonely", "n": 3}]}
    pm = new_manager()
    with pytest.raises(ConfigErrors) as e:
        check_machine(machine_from_dict(data, source=None, base_dir=tmp_path), pm)
    # kvmkit_check_device: each problem one line, behind the table it belongs to
    assert e.value.messages == ["command line: device[1] (lonely): n = 3 is odd",
                                "command line: device[1] (lonely): hooks already has device[0] (lonely)"]
    data["device"] = [{"kind": "lonely", "n": 2}]
    checked = check_machine(machine_from_dict(data, source=None, base_dir=tmp_path), pm)
    assert [d["n"] for d in checked.devices] == [2]
    import lonely_plugin
    assert lonely_plugin.CREATED == []                # checking creates nothing
    data["device"] = [{"kind": "lonely", "n": 5}]
    with pytest.raises(ConfigError, match=r"device\[0\] \(lonely\): n = 5 is odd$"):
        check_machine(machine_from_dict(data, source=None, base_dir=tmp_path), new_manager())
