"""The virtio-net plugin: spec, entry point, keys, factory through FakeContext;
MAC addresses and forward rules."""
import importlib.metadata
import socket
import sys

import pytest

from kvmkit.plugin_api import DeviceError
from kvmkit.testing import FakeContext, config, plugin_manager
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net import slirp as slirp_mod
from kvmkit_virtio_net.forward import Forward, parse_forward, parse_forwards
from kvmkit_virtio_net.mac import default_mac, format_mac, parse_mac
from kvmkit_virtio_net.net import VirtioNet
from kvmkit_virtio_net.plugin import SPEC, plugin

try:
    slirp_mod.binding()
    HAVE_SLIRP = True
except slirp_mod.SlirpUnavailable:              # pragma: no cover - libslirp-dev missing
    HAVE_SLIRP = False
needs_slirp = pytest.mark.skipif(not HAVE_SLIRP, reason="libslirp binding not built")


def create(ctx, **values):
    pm = plugin_manager(plugin)
    return pm.hook.kvmkit_create_device(kind="virtio-net", config=config(SPEC, **values), ctx=ctx)


def test_spec_keys():
    keys = {k.name: k for k in SPEC.keys}
    assert list(keys) == ["backend", "mac", "mtu", "ifname", "create", "forward", "outbound",
                          "host_loopback", "queue"]
    assert (keys["outbound"].default, keys["host_loopback"].default) == (True, True)
    assert (keys["backend"].default, keys["backend"].choices) == ("user", ("user", "tap"))
    assert (keys["mtu"].type, keys["mtu"].default, keys["mtu"].min, keys["mtu"].max) == \
        (int, 1500, 68, 65535)
    assert keys["mac"].default is None and keys["ifname"].default is None
    assert (keys["create"].type, keys["create"].default) == (bool, False)
    assert (keys["forward"].type, keys["forward"].default) == (list, [])
    assert all(k.doc for k in SPEC.keys)
    assert plugin.kvmkit_device_spec() is SPEC


def test_entry_point():
    eps = importlib.metadata.entry_points(group="kvmkit.devices")
    [ep] = [e for e in eps if e.name == "virtio-net"]
    assert ep.value == "kvmkit_virtio_net.plugin:plugin"
    assert ep.load() is plugin


@needs_slirp
def test_factory_user_backend():
    with FakeContext("virtio-net.0", machine_name="demo") as ctx:
        dev = create(ctx)
        try:
            assert isinstance(dev, VirtioNet) and ctx.virtio == [dev]
            assert dev.mac == default_mac("demo", "virtio-net.0") and dev.mtu == 1500
            assert dev.features & p.bits(p.F_CSUM, p.F_GUEST_CSUM)
            assert not dev.features & p.bits(p.F_HOST_TSO4, p.F_GUEST_TSO4)
            dev.start()
            assert any(t.name.endswith(":slirp") and t.is_alive() for t in ctx.threads)
        finally:
            dev.close()
        assert not any(t.is_alive() for t in ctx.threads)


@needs_slirp
def test_factory_with_mac_mtu_and_forwards():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with FakeContext() as ctx:
        dev = create(ctx, mac="52:54:00:ab:cd:ef", mtu=9000, forward=[f"tcp::{port}-:22"])
        try:
            assert dev.mac == bytes.fromhex("525400abcdef") and dev.config_bytes()[10:12] == \
                (9000).to_bytes(2, "little")
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass                                    # slirp listens on the forward
        finally:
            dev.close()


@needs_slirp
def test_forward_on_a_port_in_use_is_a_device_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with FakeContext() as ctx:
            with pytest.raises(DeviceError, match=f"cannot listen on 127.0.0.1:{port} \\(tcp\\): "
                                                  "Address already in use"):
                create(ctx, forward=[f"tcp::{port}-:22"])
            assert ctx.virtio == []


@pytest.mark.parametrize("values,message", [
    ({"forward": ["tcp:2222:22"]}, "forward\\[0\\]: 'tcp:2222:22' is not a forward rule"),
    ({"forward": ["tcp::2222-:22", "sctp::1-:2"]}, "forward\\[1\\]: 'sctp::1-:2': protocol"),
    ({"forward": ["tcp::2222-:22", "tcp:127.0.0.1:2222-:23"]},
     "forward\\[1\\] .*already forwarded by forward\\[0\\]"),
    ({"mac": "01:00:5e:00:00:01"}, "mac: 01:00:5e:00:00:01 is a multicast address"),
    ({"mac": "52:54:00:12:34"}, "mac: '52:54:00:12:34' is not a MAC address"),
    ({"ifname": "tap0"}, "ifname is only for backend = \"tap\""),
    ({"create": True}, "create is only for backend = \"tap\""),
    ({"backend": "tap"}, "backend = \"tap\" needs ifname"),
    ({"backend": "tap", "ifname": "tap0", "forward": ["tcp::1-:2"]},
     "forward is only for backend = \"user\""),
    ({"backend": "tap", "ifname": "kvmkit-nothere"}, "tap device 'kvmkit-nothere' does not exist"),
    ({"mtu": 65535}, "mtu 65535 is above what user-mode networking supports \\(65521\\)"),
])
def test_bad_tables(values, message):
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match=message) as e:
            create(ctx, **values)
        assert "\n" not in str(e.value) and ctx.virtio == []


def test_libslirp_missing(monkeypatch):
    monkeypatch.setattr(slirp_mod, "_binding", None)
    monkeypatch.setitem(sys.modules, "kvmkit_virtio_net._slirp", None)
    with FakeContext() as ctx:
        with pytest.raises(DeviceError, match="libslirp is not available.*apt-get install "
                                              "libslirp0 libslirp-dev.*backend = \"tap\""):
            create(ctx)


@needs_slirp
def test_backend_is_released_when_the_transport_refuses_the_device():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    class Refusing(FakeContext):
        def add_virtio(self, device, queue="auto"):
            raise DeviceError("no PCI slot left")

    with Refusing() as ctx:
        with pytest.raises(DeviceError, match="no PCI slot"):
            create(ctx, forward=[f"tcp::{port}-:22"])
    with FakeContext() as ctx:                           # the forward's port is free again
        create(ctx, forward=[f"tcp::{port}-:22"]).close()


# -- MAC addresses --------------------------------------------------------------------------------

def test_parse_and_format_mac():
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    assert parse_mac("52-54-00-AB-CD-EF") == bytes.fromhex("525400abcdef")
    assert format_mac(bytes.fromhex("525400abcdef")) == "52:54:00:ab:cd:ef"
    for bad in ("52:54:00:12:34:5g", "52:54-00:12:34:56", "525400123456", "", "00:00:00:00:00:00"):
        with pytest.raises(ValueError):
            parse_mac(bad)


def test_default_mac_is_stable_unicast_and_local():
    a = default_mac("demo", "virtio-net.0")
    assert a == default_mac("demo", "virtio-net.0")
    assert a != default_mac("demo", "virtio-net.1") and a != default_mac("other", "virtio-net.0")
    for name in ("demo", "x", "ü", ""):
        mac = default_mac(name, "virtio-net.0")
        assert len(mac) == 6 and mac[0] & 1 == 0 and mac[0] & 2 == 2
        assert parse_mac(format_mac(mac)) == mac


# -- forward rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rule,fwd", [
    ("tcp:127.0.0.1:2222-:22", Forward("tcp", "127.0.0.1", 2222, None, 22)),
    ("tcp::2222-:22", Forward("tcp", "127.0.0.1", 2222, None, 22)),
    ("UDP:0.0.0.0:5353-10.0.2.15:53", Forward("udp", "0.0.0.0", 5353, "10.0.2.15", 53)),
])
def test_forward_rules(rule, fwd):
    assert parse_forward(rule) == fwd
    assert parse_forward(str(fwd)) == fwd


@pytest.mark.parametrize("rule,message", [
    ("tcp:2222-:22", "not a forward rule"),
    ("icmp::1-:1", "protocol 'icmp' is not tcp or udp"),
    ("tcp::0-:22", "host port 0 is not in 1-65535"),
    ("tcp::70000-:22", "host port 70000"),
    ("tcp::ssh-:22", "host port 'ssh' is not a port number"),
    ("tcp::22-:", "guest port is missing"),
    ("tcp:localhost:22-:22", "host address 'localhost' is not an IPv4 address"),
    ("tcp::22-10.0.2:22", "guest address '10.0.2' is not an IPv4 address"),
    ("tcp:::1:22-:22", "not a forward rule"),
])
def test_malformed_forward_rules(rule, message):
    with pytest.raises(ValueError, match=message):
        parse_forward(rule)


def test_forward_list_names_the_rule():
    with pytest.raises(ValueError, match=r"forward\[2\]"):
        parse_forwards(["tcp::1-:1", "udp::1-:1", "bad"])
    assert len(parse_forwards(["tcp::1-:1", "udp::1-:1"])) == 2   # same port, other protocol
