"""Taps, no VM: open errors, offload flags, and frames both ways between the
device model and a network namespace the test creates."""
import json
import logging
import subprocess
import sys
import time

import pytest

from kvmkit.testing import FakeContext

from netdriver import NetDriver
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net import tap as tap_mod
from kvmkit_virtio_net.backends import TapBackend
from kvmkit_virtio_net.net import VirtioNet
from kvmkit_virtio_net.netns import NetNamespace, available
from kvmkit_virtio_net.tap import TapError, open_tap, tun_offload_flags
from netframes import GUEST_MAC, arp_request, parse_arp, parse_ipv4, udp_frame

HOST_IP, GUEST_IP = "192.168.231.1", "192.168.231.2"


def test_ioctl_numbers_match_linux_if_tun_h():
    assert tap_mod.TUNSETIFF == 0x400454CA
    assert tap_mod.TUNSETOFFLOAD == 0x400454D0
    assert tap_mod.TUNSETVNETHDRSZ == 0x400454D8
    assert tap_mod.TUNGETVNETHDRSZ == 0x800454D7


def test_offload_flags():
    f = tap_mod
    assert tun_offload_flags(False, True, True, True, True) == 0      # nothing without CSUM
    assert tun_offload_flags(True, False, False, False, False) == f.TUN_F_CSUM
    assert tun_offload_flags(True, True, True, True, True) == \
        f.TUN_F_CSUM | f.TUN_F_TSO4 | f.TUN_F_TSO6 | f.TUN_F_TSO_ECN | f.TUN_F_UFO
    assert tun_offload_flags(True, False, False, True, False) == f.TUN_F_CSUM   # ECN needs TSO


@pytest.mark.parametrize("name", ["", "x" * 16, "a/b", " tap0", "..", "tap\0"])
def test_bad_interface_names(name):
    with pytest.raises(TapError, match="not a network interface name"):
        open_tap(name)


def test_missing_tap_says_how_to_make_one():
    with pytest.raises(TapError) as e:
        open_tap("kvmkit-nothere")
    msg = str(e.value)
    assert "'kvmkit-nothere' does not exist" in msg
    assert "ip tuntap add dev kvmkit-nothere mode tap" in msg and "create = true" in msg


# -- with a network namespace ---------------------------------------------------------------------

_why = available()
needs_netns = pytest.mark.skipif(_why is not None, reason=f"no network namespaces: {_why}")


@pytest.fixture
def ns():
    with NetNamespace() as n:
        yield n


def link(ns, name):
    return json.loads(ns.ip("-j", "link", "show", "dev", name))[0]


@needs_netns
def test_create_makes_a_tap_that_goes_away_with_kvmkit(ns):
    tap = ns.call(open_tap, "kvt0", create=True, mtu=1400)
    try:
        assert tap.created and tap.ifname == "kvt0"
        info = link(ns, "kvt0")
        assert info["mtu"] == 1400 and "UP" in info["flags"]
        assert tap.supported_offloads & tap_mod.TUN_F_CSUM
        assert tap.offloads == 0                           # off until a guest negotiates
    finally:
        tap.close()
    with pytest.raises(RuntimeError, match="does not exist"):
        link(ns, "kvt0")


@needs_netns
def test_attach_to_an_existing_tap(ns):
    ns.ip("tuntap", "add", "dev", "kvt1", "mode", "tap")
    tap = ns.call(open_tap, "kvt1")
    try:
        assert not tap.created
        with pytest.raises(TapError, match="'kvt1' is in use by another process"):
            ns.call(open_tap, "kvt1")
    finally:
        tap.close()
    link(ns, "kvt1")                                     # a persistent tap stays


@needs_netns
def test_an_interface_that_is_not_a_tap(ns):
    with pytest.raises(TapError, match="'lo' exists but is not a tap device"):
        ns.call(open_tap, "lo")


@needs_netns
@pytest.mark.parametrize("owner,create,message", [
    ("65534", False, "belongs to another user or group; attaching to it needs CAP_NET_ADMIN"),
    (None, True, "creating a tap needs CAP_NET_ADMIN"),
])
def test_without_cap_net_admin(ns, owner, create, message):
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("setpriv (util-linux) is not installed")
    if owner:
        ns.ip("tuntap", "add", "dev", "kvt2", "mode", "tap", "user", owner)
    code = ("import sys\nfrom kvmkit_virtio_net.tap import open_tap, TapError\n"
            f"try:\n    open_tap('kvt2', create={create})\n"
            "except TapError as e:\n    print(e)\n    sys.exit(3)\n")
    r = subprocess.run(ns.exec_prefix() + ["setpriv", "--bounding-set=-net_admin",
                                           "--inh-caps=-net_admin", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stdout + r.stderr
    assert message in r.stdout and "permission denied" in r.stdout


# -- frames through a tap ----------------------------------------------------------------------

@pytest.fixture
def tap_net(ns):
    ns.ip("tuntap", "add", "dev", "kvt3", "mode", "tap")
    ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "kvt3")
    ns.ip("link", "set", "kvt3", "up")
    tap = ns.call(open_tap, "kvt3")
    ns.wait_up("kvt3")
    threads = FakeContext(name="net.0")          # spawn() keeps and joins the threads
    backend = TapBackend(tap, spawn=threads.spawn, log=logging.getLogger("test.tap"))
    dev = VirtioNet(backend, mac=GUEST_MAC)
    drv = NetDriver(dev)
    dev._wake = lambda index: None
    dev.start()
    yield drv, dev, backend, ns
    dev.close()
    threads.close()                               # raises if a thread is still alive


def wait_rx(drv, dev, match, timeout=5.0):
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        for hdr, frame, _ in drv.run_rx():
            seen.append(frame)
            if match(hdr, frame):
                return hdr, frame
        time.sleep(0.01)
    raise AssertionError(f"no matching frame in {len(seen)} received")


@needs_netns
def test_offloads_follow_the_guests_features(tap_net):
    drv, dev, backend, _ = tap_net
    for bit in (p.F_CSUM, p.F_HOST_TSO4, p.F_HOST_TSO6, p.F_GUEST_CSUM, p.F_GUEST_TSO4,
                p.F_GUEST_TSO6):
        assert dev.features >> bit & 1, bit
    t = tap_mod
    assert backend.tap.offloads == backend.tap.supported_offloads & \
        (t.TUN_F_CSUM | t.TUN_F_TSO4 | t.TUN_F_TSO6 | t.TUN_F_TSO_ECN | t.TUN_F_UFO)
    dev.reset()
    assert backend.tap.offloads == 0


@needs_netns
def test_arp_through_the_tap(tap_net):
    drv, dev, _, _ = tap_net
    drv.post_rx(32)
    drv.send(arp_request(GUEST_MAC, GUEST_IP, HOST_IP))

    def is_reply(hdr, frame):
        arp = parse_arp(frame)
        return arp is not None and arp["op"] == 2 and arp["sender_ip"] == HOST_IP
    _, frame = wait_rx(drv, dev, is_reply)
    assert parse_arp(frame)["target_mac"] == GUEST_MAC and frame[:6] == GUEST_MAC
    assert dev.stats["tx_frames"] == 1 and dev.stats["rx_frames"] >= 1


@needs_netns
def test_udp_both_ways_with_checksum_offload(tap_net):
    drv, dev, _, ns = tap_net
    drv.post_rx(64)
    host = ns.call(__import__("socket").socket, 2, 2)         # AF_INET, SOCK_DGRAM
    try:
        host.bind((HOST_IP, 0))
        host.settimeout(5)
        port = host.getsockname()[1]
        ns.ip("neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", "kvt3")
        host_mac = bytes.fromhex(link(ns, "kvt3")["address"].replace(":", ""))
        # guest -> host, checksum left to the device (NEEDS_CSUM): the tap takes it as is
        frame = bytearray(udp_frame(b"from the guest", src=GUEST_IP, dst=HOST_IP, dport=port,
                                    dst_mac=host_mac))
        from kvmkit_virtio_net.checksum import ones_complement_sum
        pseudo = bytes(frame[26:34]) + bytes((0, 17)) + (len(frame) - 34).to_bytes(2, "big")
        frame[40:42] = ones_complement_sum(pseudo).to_bytes(2, "big")
        drv.send(bytes(frame), p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
        data, peer = host.recvfrom(2048)
        assert data == b"from the guest" and peer == (GUEST_IP, 6665)
        # host -> guest: a large datagram, with the tap's header passed on
        payload = bytes(range(256)) * 5
        host.sendto(payload, (GUEST_IP, 6665))

        def is_it(hdr, f):
            ip = parse_ipv4(f)
            return ip is not None and ip["proto"] == 17 and ip.get("dport") == 6665
        hdr, got = wait_rx(drv, dev, is_it)
        ip = parse_ipv4(got)
        assert ip["payload"] == payload and ip["src"] == HOST_IP
        if hdr.flags & p.HDR_F_NEEDS_CSUM:
            assert (hdr.csum_start, hdr.csum_offset) == (34, 6)
        else:
            assert ip["l4_checksum_ok"]
    finally:
        host.close()


@needs_netns
def test_frames_above_the_guest_mtu_from_the_tap_are_counted(tap_net):
    drv, dev, _, ns = tap_net
    ns.ip("link", "set", "kvt3", "mtu", "4000")
    ns.ip("neigh", "replace", GUEST_IP, "lladdr", GUEST_MAC.hex(":"), "dev", "kvt3")
    drv.post_rx(64)
    host = ns.call(__import__("socket").socket, 2, 2)
    try:
        host.sendto(bytes(3000), (GUEST_IP, 6665))         # one 3042-byte frame: MTU 1500
        host.sendto(b"small", (GUEST_IP, 6665))

        def small(hdr, f):
            ip = parse_ipv4(f)
            return ip is not None and ip.get("payload") == b"small"
        wait_rx(drv, dev, small)
        assert dev.stats["rx_oversize"] == 1
    finally:
        host.close()
