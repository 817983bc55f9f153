"""The device-plugin contract (kvmkit.contract) fails broken plugins, with a
message that says what to fix, and passes good ones."""
import os
import subprocess
import sys
import textwrap

import pytest

from kvmkit.contract import ContractFailure, ContractSetupError, KindContract, kinds_of
from kvmkit.plugin_api import DeviceError

HEADER = """
import threading
from pathlib import Path
from kvmkit.plugin_api import DevicePlugin, DeviceSpec, Key, DeviceError, VirtioDevice
"""

GOOD = HEADER + """
SPEC = DeviceSpec("scratch", "a scratch register", (Key("port", int, 0x510, "the port"),))

class Scratch:
    def __init__(self, config, ctx):
        self.value = 0
        ctx.add_io("pio", config.port, 4, self)
    def read(self, offset, size):
        return self.value
    def write(self, offset, size, value):
        self.value = value
    def snapshot_state(self):
        return {"version": 1, "value": self.value}
    def restore_state(self, state):
        self.value = state["value"]

plugin = DevicePlugin(SPEC, Scratch)
"""


def contract(throwaway_dist, source, kind="scratch", description=""):
    throwaway_dist("kvmkit-scratch", {"scratch_plugin": source}, {kind: "scratch_plugin:plugin"},
                   description=description)
    [target] = kinds_of("kvmkit-scratch")
    return KindContract(target)


def all_checks(c, tmp_path, configs=None, readme=None, **kw):
    c.check_loads()
    c.check_hooks()
    c.check_spec()
    c.check_keys()
    c.check_readme(readme)
    c.check_device(configs, tmp_path, **kw)
    c.check_state(configs, tmp_path)


def test_a_good_plugin_passes(throwaway_dist, tmp_path):
    all_checks(contract(throwaway_dist, GOOD), tmp_path, readme="kind `scratch`, key `port`")


def test_unknown_distribution_and_one_without_kinds(throwaway_dist):
    with pytest.raises(ContractSetupError, match="'no-such-dist' is not installed"):
        kinds_of("no-such-dist")
    with pytest.raises(ContractSetupError, match="declares no entry points in 'kvmkit.devices'"):
        kinds_of("pluggy")


def test_import_failure(throwaway_dist):
    c = contract(throwaway_dist, "import does_not_exist_anywhere\n")
    with pytest.raises(ContractFailure, match=r"scratch: entry point 'scratch_plugin:plugin' does "
                                              r"not load: ModuleNotFoundError"):
        c.check_loads()


def test_misspelled_hook(throwaway_dist):
    source = GOOD + "\nfrom kvmkit.plugin_api import hookimpl\n" \
                    "class Extra(DevicePlugin):\n" \
                    "    @hookimpl\n    def kvmkit_vm_stoped(self, vm):\n        pass\n" \
                    "plugin = Extra(SPEC, Scratch)\n"
    with pytest.raises(ContractFailure, match="implements a hook kvmkit does not have"):
        contract(throwaway_dist, source).check_hooks()


def test_a_plugin_without_create_device(throwaway_dist):
    source = HEADER + """
from kvmkit.plugin_api import hookimpl
class OnlySpec:
    @hookimpl
    def kvmkit_device_spec(self):
        return DeviceSpec("scratch", "x")
plugin = OnlySpec()
"""
    with pytest.raises(ContractFailure, match="implements no kvmkit_create_device hook"):
        contract(throwaway_dist, source).check_hooks()


def test_spec_kind_must_be_the_entry_point_name(throwaway_dist):
    c = contract(throwaway_dist, GOOD, kind="scratch-two")
    with pytest.raises(ContractFailure, match="declares kinds 'scratch' but not 'scratch-two'"):
        c.check_spec()


def test_spec_needs_a_summary(throwaway_dist):
    c = contract(throwaway_dist, GOOD.replace('"a scratch register"', '""'))
    with pytest.raises(ContractFailure, match="no summary"):
        c.check_spec()


@pytest.mark.parametrize("key, message", [
    ('Key("port", int, 0x510, "")', "key 'port': no doc string"),
    ('Key("port", int, "0x510", "the port")', "default '0x510' is not a int"),
    ('Key("port", int, True, "the port")', "default True is not a int"),
    ('Key("port", dict, None, "the port")', "type <class 'dict'> is not one the core validates"),
    ('Key("mode", str, "fast", "speed", choices=("slow", "medium"))',
     "default 'fast' is not one of its choices"),
    ('Key("mode", str, "slow", "speed", choices=("slow", 2))', "choice 2 is not a string"),
    ('Key("port", int, 0x510, "the port", min=0, max=0xFF)', "default 1296 is above its max 255"),
    ('Key("2fast", int, 1, "x")', "not a usable TOML key name"),
    ('Key("kind", str, "x", "x")', "'kind' is the machine file's"),
])
def test_bad_keys(throwaway_dist, key, message):
    source = GOOD.replace('(Key("port", int, 0x510, "the port"),)', f"({key},)")
    with pytest.raises(ContractFailure, match=message.replace("(", r"\(").replace(")", r"\)")):
        contract(throwaway_dist, source).check_keys()


def test_readme_must_name_the_kind_and_every_key(throwaway_dist):
    c = contract(throwaway_dist, GOOD)
    c.check_readme(None)                                 # no README shipped: nothing to check
    with pytest.raises(ContractFailure, match="does not mention 'port'"):
        c.check_readme("# scratch\nkind `scratch` has no keys; portable!")


def test_a_register_that_raises(throwaway_dist, tmp_path):
    source = GOOD.replace("        return self.value",
                          "        if offset == 3:\n            raise IndexError('no register 3')\n"
                          "        return self.value")
    with pytest.raises(ContractFailure, match=r"read of pio 0x513 \(size 1\) raised IndexError: "
                                              r"no register 3 \(access \d+ of the register fuzz\)"):
        contract(throwaway_dist, source).check_device(None, tmp_path)


def test_documented_errors_may_pass(throwaway_dist, tmp_path):
    source = GOOD.replace("        return self.value", "        raise DeviceError('nope')")
    contract(throwaway_dist, source).check_device(None, tmp_path, allowed_errors=(DeviceError,))


def test_a_read_that_returns_none(throwaway_dist, tmp_path):
    source = GOOD.replace("        return self.value", "        pass")
    with pytest.raises(ContractFailure, match=r"returned None, not an int"):
        contract(throwaway_dist, source).check_device(None, tmp_path)


def test_a_device_the_guest_cannot_reach(throwaway_dist, tmp_path):
    source = GOOD.replace('        ctx.add_io("pio", config.port, 4, self)\n', "")
    with pytest.raises(ContractFailure, match="registered no I/O range"):
        contract(throwaway_dist, source).check_device(None, tmp_path)


def test_a_thread_that_outlives_close(throwaway_dist, tmp_path):
    source = GOOD.replace('        ctx.add_io("pio", config.port, 4, self)\n',
                          '        ctx.add_io("pio", config.port, 4, self)\n'
                          '        self.stop = threading.Event()\n'
                          '        threading.Thread(target=self.stop.wait, args=(1,), name="forever",'
                          ' daemon=True).start()\n')
    with pytest.raises(ContractFailure, match="threads still running after close\\(\\): forever"):
        contract(throwaway_dist, source).check_device(None, tmp_path, thread_grace=0.2)


def test_a_spawned_thread_that_ignores_stopping(throwaway_dist, tmp_path):
    source = GOOD.replace("plugin = DevicePlugin(SPEC, Scratch)", """
import time
class Busy(Scratch):
    def start(self):
        self.ctx_spawned = True
        self._ctx.spawn("busy", lambda: time.sleep(1))
    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self._ctx = ctx
plugin = DevicePlugin(SPEC, Busy)
""")
    with pytest.raises(ContractFailure, match="still running after stop: scratch.0:busy"):
        contract(throwaway_dist, source).check_device(None, tmp_path, thread_grace=0.2)


def test_required_keys_need_example_tables(throwaway_dist, tmp_path):
    source = GOOD.replace('Key("port", int, 0x510, "the port")',
                          'Key("port", int, 0x510, "the port"), Key("path", Path, doc="a file")')
    c = contract(throwaway_dist, source)
    with pytest.raises(ContractFailure, match="path are required.*pytest_kvmkit_contract_configs"):
        c.check_device(None, tmp_path)
    (tmp_path / "f").write_text("x")
    c.check_device([{"path": "f"}], tmp_path)
    with pytest.raises(ContractFailure, match=r"example table 0 does not validate: .*unknown key 'colour'"):
        c.check_device([{"path": "f", "colour": 1}], tmp_path)


def test_creation_errors_name_the_table(throwaway_dist, tmp_path):
    source = GOOD.replace("        self.value = 0\n", "        raise DeviceError('port busy')\n")
    with pytest.raises(ContractFailure, match=r"scratch with \{'port': 1\}: kvmkit_create_device "
                                              r"raised DeviceError: port busy"):
        contract(throwaway_dist, source).check_device([{"port": 1}], tmp_path)


VIRTIO = HEADER + """
from kvmkit.plugin_api import VirtqueueError
SPEC = DeviceSpec("scratch", "a virtio scratch device", ())

class Model(VirtioDevice):
    device_id = 42
    queue_sizes = (8,)
    def process(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            BODY
            q.push(chain.head, 0)

def create(config, ctx):
    model = Model()
    ctx.add_virtio(model)
    return model

plugin = DevicePlugin(SPEC, create)
"""


def test_virtio_device_that_only_raises_virtqueue_errors_passes(throwaway_dist, tmp_path):
    c = contract(throwaway_dist, VIRTIO.replace("BODY", "pass"))
    c.check_device(None, tmp_path)


def test_virtio_device_that_raises_on_a_request(throwaway_dist, tmp_path):
    c = contract(throwaway_dist, VIRTIO.replace("BODY", "if chain.writable_len > 4000: "
                                                        "raise ValueError('too long')"))
    with pytest.raises(ContractFailure, match=r"virtio process\(0\) on garbage rings .* raised "
                                              r"ValueError: too long; only VirtqueueError"):
        c.check_device(None, tmp_path)


def test_virtio_device_with_a_bad_queue_size(throwaway_dist, tmp_path):
    c = contract(throwaway_dist, VIRTIO.replace("BODY", "pass").replace("(8,)", "(6,)"))
    with pytest.raises(ContractFailure, match=r"queue_sizes \[6\]"):
        c.check_device(None, tmp_path)


# -- pytest --kvmkit-contract, end to end --------------------------------------------------------
def pytest_run(cwd, *args, env_path=""):
    env = dict(os.environ, PYTHONPATH=env_path)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_contract_option_on_a_project_folder(tmp_path):
    from distributions import write_distribution
    site = write_distribution(tmp_path / "site", "kvmkit-scratch",
                              {"scratch_plugin": GOOD.replace("return self.value",
                                                              "return None")},
                              {"scratch": "scratch_plugin:plugin"})
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text('[project]\nname = "kvmkit-scratch"\nversion = "1.0"\n')
    (project / "tests" / "test_own.py").write_text("def test_own():\n    pass\n")
    r = pytest_run(project, "--kvmkit-contract", env_path=str(site))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 7 passed" in r.stdout, r.stdout        # its own test and 6 of 7 checks
    assert "kvmkit contract: scratch with its defaults: read of pio" in r.stdout
    assert "FAILED kvmkit-contract[kvmkit-scratch]::device[scratch]" in r.stdout

    r = pytest_run(project, "--kvmkit-contract=kvmkit-scratch", "-m", "kvmkit_contract",
                   "-k", "not device", env_path=str(site))
    assert r.returncode == 0 and "6 passed" in r.stdout, r.stdout + r.stderr


def test_contract_option_usage_errors(tmp_path):
    r = pytest_run(tmp_path, "--kvmkit-contract=kvmkit-nothing-like-this")
    assert r.returncode == 4
    assert "--kvmkit-contract: distribution 'kvmkit-nothing-like-this' is not installed" in r.stderr
    r = pytest_run(tmp_path, "--kvmkit-contract")
    assert r.returncode == 4 and "no pyproject.toml with a [project] name" in r.stderr


def test_contract_hooks_feed_tables_and_documented_errors(tmp_path):
    from distributions import write_distribution
    source = GOOD.replace('(Key("port", int, 0x510, "the port"),)',
                          '(Key("port", int, 0x510, "the port"), Key("path", Path, doc="a file"))')
    source = source.replace("        return self.value", "        raise LookupError('documented')")
    site = write_distribution(tmp_path / "site", "kvmkit-scratch", {"scratch_plugin": source},
                              {"scratch": "scratch_plugin:plugin"})
    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text('[project]\nname = "kvmkit-scratch"\n')
    (project / "conftest.py").write_text(textwrap.dedent("""
        def pytest_kvmkit_contract_configs(kind, tmp_path):
            (tmp_path / "data").write_text("x")
            return [{"path": "data"}, {"path": "data", "port": 0x600}]

        def pytest_kvmkit_contract_allowed_errors(kind):
            return (LookupError,)
    """))
    r = pytest_run(project, "--kvmkit-contract", "-m", "kvmkit_contract", "-k", "device",
                   env_path=str(site))
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout + r.stderr


# -- queue backends: the contract runs a virtio kind on each installed one -------------------------
RECORDING = VIRTIO.replace("BODY", "pass").replace("""    def process(self, index):""", """    def activate(self, queues, features):
        super().activate(queues, features)
        SEEN.add((self.queue_backend.name, type(queues[0]).__name__))
    def process(self, index):""").replace(
    "SPEC = DeviceSpec(\"scratch\", \"a virtio scratch device\", ())",
    "SPEC = DeviceSpec(\"scratch\", \"a virtio scratch device\", (QUEUE_KEY,))\nSEEN = set()").replace(
    "ctx.add_virtio(model)", "ctx.add_virtio(model, queue=config['queue'])").replace(
    "from kvmkit.plugin_api import VirtqueueError", "from kvmkit.plugin_api import VirtqueueError, QUEUE_KEY")


def test_a_virtio_kind_runs_on_every_queue_backend(throwaway_dist, tmp_path):
    from requirement import need_module
    need_module("kvmkit_native", "kvmkit-native")
    c = contract(throwaway_dist, RECORDING)
    c.check_device(None, tmp_path)
    import scratch_plugin
    assert scratch_plugin.SEEN == {("python", "SplitQueue"), ("native", "NativeSplitQueue")}
    scratch_plugin.SEEN.clear()
    c.check_device([{"queue": "python"}], tmp_path)          # a table that names one keeps it
    assert scratch_plugin.SEEN == {("python", "SplitQueue")}


def test_the_virtio_blk_contract_starts_the_native_engine(tmp_path):
    import logging
    from requirement import need_module
    need_module("kvmkit_native", "kvmkit-native")
    need_module("kvmkit_virtio_blk", "kvmkit-virtio-blk")
    [target] = [t for t in kinds_of("kvmkit-virtio-blk") if t.kind == "virtio-blk"]
    (tmp_path / "disk.img").write_bytes(bytes(1 << 20))

    class Keep(logging.Handler):
        def __init__(self):
            super().__init__(logging.INFO)
            self.lines = []

        def emit(self, record):
            self.lines.append(record.getMessage())

    keep, logger = Keep(), logging.getLogger("kvmkit")   # whatever else configured it
    old_level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        KindContract(target).check_device([{"path": "disk.img"}], tmp_path, virtio_rounds=3)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(old_level)
    started = [line for line in keep.lines if "runs on the native engine" in line]
    assert len(started) == 3, keep.lines[-10:]


# -- the state chapter (kvmkit.contract.state) ----------------------------------------------------
def test_state_a_device_without_state_support_fails_saying_what_to_add(throwaway_dist, tmp_path):
    source = GOOD.replace("    def snapshot_state(self):", "    def _no_snapshot_state(self):")
    with pytest.raises(ContractFailure, match="device scratch.0: its plugin has no state support.*"
                                              "give the device snapshot_state"):
        contract(throwaway_dist, source).check_state(None, tmp_path)


def test_state_a_restore_that_forgets_a_field_fails(throwaway_dist, tmp_path):
    source = GOOD.replace('        self.value = state["value"]', "        pass")
    with pytest.raises(ContractFailure, match=r"restored device saves another state: "
                                              r"state\['device'\]\['value'\] is"):
        contract(throwaway_dist, source).check_state(None, tmp_path)


def test_state_that_is_not_plain_data_fails(throwaway_dist, tmp_path):
    source = GOOD.replace('return {"version": 1, "value": self.value}',
                          'return {"version": 1, "value": bytes(4)}')
    with pytest.raises(ContractFailure, match="returned a bytes at state.'value'"):
        contract(throwaway_dist, source).check_state(None, tmp_path)


def test_state_hidden_from_the_snapshot_shows_as_other_behaviour(throwaway_dist, tmp_path):
    source = GOOD.replace("        self.value = 0\n", "        self.value = 0\n        self.reads = 0\n")
    source = source.replace("        return self.value",
                            "        self.reads += 1\n        return self.value + self.reads")
    with pytest.raises(ContractFailure, match="access [0-9]+ after the restore: read of pio 0x51"
                                              ".* on the saved device, .* on the restored one"):
        contract(throwaway_dist, source).check_state(None, tmp_path)


HOLDING = VIRTIO.replace("""    def process(self, index):
        q = self.queues[index]
        while (chain := q.pop()) is not None:
            BODY
            q.push(chain.head, 0)""", """    held = None
    def process(self, index):
        q = self.queues[index]
        if self.held is not None:               # returned at the next kick
            q.push(self.held.head, 0)
        self.held = q.pop()
    def snapshot_state(self):
        return {"version": 1}
    def restore_state(self, state):
        pass""")


def test_state_a_virtio_model_that_keeps_a_chain_across_the_save_fails(throwaway_dist, tmp_path):
    with pytest.raises(ContractFailure, match=r"chain [0-9]+ after the restore: the saved device "
                                              r"returned \[\(0, [0-9]+, 0\)\], the restored one \[\]"):
        contract(throwaway_dist, HOLDING).check_state(None, tmp_path)


def test_state_a_virtio_model_that_gives_held_chains_back_passes(throwaway_dist, tmp_path):
    source = HOLDING.replace("""        return {"version": 1}""", """        if self.held is not None:           # un-pop it: it is the last one taken
            self.queues[0].last_avail_idx = (self.queues[0].last_avail_idx - 1) & 0xFFFF
            self.held = None
        return {"version": 1}""")
    contract(throwaway_dist, source).check_state(None, tmp_path)
