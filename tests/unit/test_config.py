from pathlib import Path

import pytest

from kvmkit.config import ConfigError, DeviceTable, load_machine, validate_device
from kvmkit.plugin_api import DeviceSpec, Key, Size


def write(tmp_path, text, name="m.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


GOOD = """
[machine]
memory = "512M"
vcpus = 2

[kernel]
image = "k/vmlinux"
initrd = "initrd.cpio"
cmdline = "console=ttyS0"

[[device]]
kind = "serial8250"
port = 0x2f8
"""


def test_a_good_file(tmp_path):
    cfg = load_machine(write(tmp_path, GOOD, "demo.toml"))
    assert cfg.name == "demo"                                   # the file's stem
    assert cfg.memory == 512 << 20 and cfg.vcpus == 2
    assert cfg.kernel.image == tmp_path / "k" / "vmlinux"       # relative to the file
    assert cfg.kernel.initrd == tmp_path / "initrd.cpio"
    assert cfg.devices[0].kind == "serial8250"
    assert cfg.devices[0].values == {"port": 0x2F8}
    assert cfg.host_quirks == "auto"
    assert cfg.stall_timeout == 0                               # the stall watchdog is off


def test_stall_timeout_in_seconds(tmp_path):
    cfg = load_machine(write(tmp_path, "[machine]\nstall_timeout = 90\n[kernel]\nimage='x'"))
    assert cfg.stall_timeout == 90.0
    cfg = load_machine(write(tmp_path, "[machine]\nstall_timeout = 2.5\n[kernel]\nimage='x'"))
    assert cfg.stall_timeout == 2.5


@pytest.mark.parametrize("text,message", [
    ("[machine]\nmemory = 1\n[kernel]\nimage='x'", r"m\.toml: \[machine\] memory: .*at least 16M"),
    ("[machine]\nmemory = 'lots'\n[kernel]\nimage='x'", r"\[machine\] memory: 'lots' is not a size"),
    ("[machine]\nvcpus = 0\n[kernel]\nimage='x'", r"\[machine\] vcpus: expected a whole number"),
    ("[machine]\nvcpus = true\n[kernel]\nimage='x'", r"\[machine\] vcpus"),
    ("[machine]\ncpus = 2\n[kernel]\nimage='x'", r"\[machine\]: unknown key 'cpus'"),
    ("[machine]\n", r"\[kernel\] image is missing"),
    ("[kernel]\nimage = 3", r"\[kernel\] image: expected a string"),
    ("[kernel]\nimage='x'\n[[device]]\nport = 1", r"device\[0\]: missing 'kind'"),
    ("[kernel]\nimage='x'\n[machine]\nhost_quirks='maybe'", r"host_quirks: expected one of auto, on, off"),
    ("[kernel]\nimage='x'\nextra=1", r"unknown key 'extra'"),
    ("[kernel]\nimage='x'\n[machine]\nstall_timeout='1m'",
     r"m\.toml: \[machine\] stall_timeout: expected a number of seconds \(0 turns the watchdog off\), got '1m'"),
    ("[kernel]\nimage='x'\n[machine]\nstall_timeout=-1", r"\[machine\] stall_timeout: expected a number"),
    ("[kernel\nimage='x'", r"m\.toml: not valid TOML"),
])
def test_errors_name_the_file_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_machine(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="machine file not found"):
        load_machine(tmp_path / "nope.toml")


SPEC = DeviceSpec("thing", "a test device", (
    Key("port", int, 0x3F8, "I/O port", min=0, max=0xFFFF),
    Key("enabled", bool, True, "on or off"),
    Key("backend", str, "stdio", "where", choices=("stdio", "file")),
    Key("path", Path, None, "a file"),
    Key("size", Size, "1M", "bytes"),
    Key("forward", list, (), "rules"),
    Key("serial", str, doc="required serial"),
))


def table(tmp_path, **values):
    return DeviceTable("thing", values, "m.toml: device[0] (thing)", tmp_path)


def test_device_defaults_and_types(tmp_path):
    cfg = validate_device(table(tmp_path, serial="x", path="disk.img", size="2M", forward=["a"]), SPEC)
    assert cfg.port == 0x3F8 and cfg.enabled is True and cfg.backend == "stdio"
    assert cfg.path == tmp_path / "disk.img"
    assert cfg.size == 2 << 20 and cfg.forward == ("a",)
    assert cfg["serial"] == "x" and cfg.kind == "thing"


@pytest.mark.parametrize("values,message", [
    ({}, r"device\[0\] \(thing\): missing required key 'serial'"),
    ({"serial": "x", "port": "0x3f8"}, r"port: expected an integer"),
    ({"serial": "x", "port": 0x10000}, r"port: 65536 is above the maximum"),
    ({"serial": "x", "enabled": 1}, r"enabled: expected true or false"),
    ({"serial": "x", "backend": "tty"}, r"backend: 'tty' is not one of 'stdio', 'file'"),
    ({"serial": "x", "colour": "red"}, r"unknown key 'colour' \(known keys: backend, enabled"),
    ({"serial": "x", "size": "big"}, r"size: 'big' is not a size"),
    ({"serial": "x", "forward": "a"}, r"forward: expected a list of strings"),
])
def test_device_errors(tmp_path, values, message):
    with pytest.raises(ConfigError, match=message):
        validate_device(table(tmp_path, **values), SPEC)


@pytest.mark.parametrize("text,value", [("256M", 256 << 20), ("1G", 1 << 30), ("4096", 4096),
                                        (8192, 8192), ("2GiB", 2 << 30), ("64k", 64 << 10)])
def test_sizes(text, value):
    assert Size.parse(text) == value
