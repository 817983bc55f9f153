"""The libslirp binding with synthetic frames, no VM: DHCP, ARP, UDP out to
a host socket, port forwards, the event loop; and the user backend under
the device model."""
import os
import socket
import sys
import threading
import time

import pytest

from kvmkit.testing import FakeContext

from netdriver import NetDriver
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net import slirp as slirp_mod
from kvmkit_virtio_net.backends import UserBackend
from kvmkit_virtio_net.checksum import ones_complement_sum
from kvmkit_virtio_net.forward import parse_forward
from kvmkit_virtio_net.net import VirtioNet
from netframes import (DHCP_ACK, DHCP_DISCOVER, DHCP_OFFER, DHCP_REQUEST, GUEST_MAC, arp_request,
                       dhcp_frame, parse_arp, parse_dhcp, parse_ipv4, udp_frame)

try:
    slirp_mod.binding()
except slirp_mod.SlirpUnavailable as e:          # pragma: no cover - libslirp-dev missing
    pytestmark = pytest.mark.skip(reason=str(e))

SLIRP_MAC = bytes.fromhex("52550a000202")      # libslirp's own address for 10.0.2.2


@pytest.fixture
def slirp():
    got: list[bytes] = []
    s = slirp_mod.Slirp(got.append)
    s.frames = got
    yield s
    s.close()


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lease(s) -> None:
    """DISCOVER + REQUEST, so slirp knows the guest's MAC and address."""
    s.input(dhcp_frame(DHCP_DISCOVER))
    s.input(dhcp_frame(DHCP_REQUEST, requested="10.0.2.15", server="10.0.2.2"))
    s.frames.clear()


def test_version(slirp):
    assert slirp.version.split(".")[0] == "4"


def test_dhcp_discover_gets_an_offer_of_10_0_2_15(slirp):
    slirp.input(dhcp_frame(DHCP_DISCOVER))
    offers = [d for d in map(parse_dhcp, slirp.frames) if d]
    assert len(offers) == 1
    offer = offers[0]
    assert offer["op"] == 2 and offer["type"] == DHCP_OFFER and offer["xid"] == 0x4B564D4B
    assert offer["yiaddr"] == "10.0.2.15"
    assert (offer["router"], offer["dns"], offer["mask"]) == ("10.0.2.2", "10.0.2.3", "255.255.255.0")
    ip = parse_ipv4(slirp.frames[0])
    assert ip["src"] == "10.0.2.2" and ip["src_mac"] == SLIRP_MAC
    assert ip["ip_checksum_ok"] and ip["l4_checksum_ok"]


def test_dhcp_request_gets_an_ack(slirp):
    slirp.input(dhcp_frame(DHCP_DISCOVER))
    slirp.frames.clear()
    slirp.input(dhcp_frame(DHCP_REQUEST, requested="10.0.2.15", server="10.0.2.2"))
    [ack] = [d for d in map(parse_dhcp, slirp.frames) if d]
    assert ack["type"] == DHCP_ACK and ack["yiaddr"] == "10.0.2.15"


def test_arp_for_the_gateway(slirp):
    slirp.input(arp_request(GUEST_MAC, "10.0.2.15", "10.0.2.2"))
    [reply] = [a for a in map(parse_arp, slirp.frames) if a]
    assert reply["op"] == 2 and reply["sender_ip"] == "10.0.2.2"
    assert reply["sender_mac"] == SLIRP_MAC and reply["target_mac"] == GUEST_MAC


def test_udp_to_10_0_2_2_reaches_the_hosts_loopback_and_the_answer_comes_back(slirp):
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        host.bind(("127.0.0.1", port))
        host.settimeout(5)
        lease(slirp)
        slirp.input(udp_frame(b"kernel log line", dport=port))
        data, peer = host.recvfrom(2048)
        assert data == b"kernel log line"
        host.sendto(b"answer", peer)
        deadline = time.monotonic() + 5
        answer = None
        while answer is None and time.monotonic() < deadline:
            slirp.poll_once(100)
            for f in slirp.frames:
                ip = parse_ipv4(f)
                if ip and ip["proto"] == 17 and ip.get("payload") == b"answer":
                    answer = ip
        assert answer is not None
        assert (answer["src"], answer["sport"], answer["dst"], answer["dport"]) == \
            ("10.0.2.2", port, "10.0.2.15", 6665)
        assert answer["dst_mac"] == GUEST_MAC and answer["l4_checksum_ok"]


def test_a_bad_checksum_from_the_guest_is_dropped_by_slirp(slirp):
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        host.bind(("127.0.0.1", port))
        host.settimeout(0.5)
        frame = bytearray(udp_frame(b"corrupt", dport=port))
        frame[-1] ^= 0xFF
        slirp.input(bytes(frame))
        with pytest.raises(TimeoutError):
            host.recvfrom(2048)


def test_tcp_forward_reaches_the_guest_as_a_syn(slirp):
    port = free_port(socket.SOCK_STREAM)
    slirp.add_forward(parse_forward(f"tcp:127.0.0.1:{port}-:22"))
    lease(slirp)
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        syn = None
        deadline = time.monotonic() + 5
        while syn is None and time.monotonic() < deadline:
            slirp.poll_once(100)
            for f in slirp.frames:
                ip = parse_ipv4(f)
                if ip and ip["proto"] == 6 and ip.get("dport") == 22:
                    syn = ip
        assert syn is not None, slirp.frames
        assert syn["dst"] == "10.0.2.15" and syn["tcp_flags"] & 0x02 and syn["l4_checksum_ok"]
        assert "22" in slirp.connection_info()
    finally:
        client.close()


def test_udp_forward_reaches_the_guest(slirp):
    port = free_port()
    slirp.add_forward(parse_forward(f"udp::{port}-:5353"))
    lease(slirp)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.sendto(b"query", ("127.0.0.1", port))
        seen = None
        deadline = time.monotonic() + 5
        while seen is None and time.monotonic() < deadline:
            slirp.poll_once(100)
            for f in slirp.frames:
                ip = parse_ipv4(f)
                if ip and ip["proto"] == 17 and ip.get("dport") == 5353:
                    seen = ip
    assert seen is not None and seen["payload"] == b"query" and seen["dst"] == "10.0.2.15"


def test_slirp_timers_fire_from_the_event_loop(slirp):
    ffi, lib = slirp_mod.binding()
    fired = []

    @ffi.callback("void(void *)")
    def on_timer(opaque):
        fired.append(time.monotonic())

    # what libslirp does with a timer: create, arm (absolute ms of its clock), free
    timer = lib.kvmkit_slirp_timer_new(on_timer, ffi.NULL, slirp._handle)
    armed = time.monotonic()
    lib.kvmkit_slirp_timer_mod(timer, time.monotonic_ns() // 1_000_000 + 150, slirp._handle)
    while not fired and time.monotonic() - armed < 3:
        slirp.poll_once(1000)
    assert len(fired) == 1 and 0.14 <= fired[0] - armed < 1.0     # not a 1 s poll timeout
    slirp.poll_once(10)
    assert len(fired) == 1                                        # once per arming
    lib.kvmkit_slirp_timer_free(timer, slirp._handle)
    assert slirp._timers == {}


def test_forward_to_a_port_in_use(slirp):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(slirp_mod.SlirpError, match=f"127.0.0.1:{port} \\(tcp\\): Address already in use"):
            slirp.add_forward(parse_forward(f"tcp::{port}-:22"))


def test_udp_forward_to_a_port_in_use(slirp):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with pytest.raises(slirp_mod.SlirpError, match="Address already in use"):
            slirp.add_forward(parse_forward(f"udp::{port}-:53"))


def test_forward_to_a_guest_outside_the_network(slirp):
    with pytest.raises(slirp_mod.SlirpError, match="192.168.1.2 is not a guest.s address inside 10.0.2.0/24"):
        slirp.add_forward(parse_forward(f"tcp::{free_port(socket.SOCK_STREAM)}-192.168.1.2:22"))


def test_event_loop_stops_on_its_eventfd(slirp):
    stop = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    t = threading.Thread(target=slirp.run, args=(stop,))
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    os.eventfd_write(stop, 1)
    t.join(3)
    os.close(stop)
    assert not t.is_alive() and time.monotonic() - t0 < 1.5


def test_mtu_outside_slirps_range():
    with pytest.raises(slirp_mod.SlirpError, match="68-65521"):
        slirp_mod.Slirp(lambda f: None, mtu=65522)


def test_libslirp_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(slirp_mod, "_binding", None)
    monkeypatch.setitem(sys.modules, "kvmkit_virtio_net._slirp", None)
    with pytest.raises(slirp_mod.SlirpUnavailable) as e:
        slirp_mod.Slirp(lambda f: None)
    assert "libslirp is not available" in str(e.value) and "apt-get install libslirp0" in str(e.value)
    assert "\n" not in str(e.value)


# -- the user backend under the device model ----------------------------------------------------

@pytest.fixture
def user_net():
    import logging
    threads = FakeContext(name="net.0")          # spawn() keeps and joins the threads
    backend = UserBackend(spawn=threads.spawn, log=logging.getLogger("test.user"))
    dev = VirtioNet(backend, mac=GUEST_MAC)
    drv = NetDriver(dev)
    woken = []
    dev._wake = woken.append
    yield drv, dev, backend, threads
    dev.close()
    threads.close()                               # raises if a thread is still alive


def test_dhcp_through_the_device(user_net):
    drv, dev, _, _ = user_net
    drv.post_rx(4)
    drv.send(dhcp_frame(DHCP_DISCOVER))
    [(hdr, frame, _)] = drv.run_rx()
    offer = parse_dhcp(frame)
    assert offer["type"] == DHCP_OFFER and offer["yiaddr"] == "10.0.2.15"
    assert hdr.flags == p.HDR_F_DATA_VALID       # GUEST_CSUM negotiated, slirp's sums are right


def test_partial_checksums_from_the_guest_are_finished_for_slirp(user_net):
    drv, dev, backend, _ = user_net
    assert dev.negotiated(p.F_CSUM)
    backend.start()
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        host.bind(("127.0.0.1", port))
        host.settimeout(5)
        frame = bytearray(udp_frame(b"partial", dport=port))
        pseudo = bytes(frame[26:34]) + bytes((0, 17)) + (len(frame) - 34).to_bytes(2, "big")
        frame[40:42] = ones_complement_sum(pseudo).to_bytes(2, "big")
        drv.send(bytes(frame), p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6))
        assert host.recvfrom(2048)[0] == b"partial"   # slirp drops a frame with a bad checksum


def test_frames_from_slirp_are_dropped_and_counted_when_the_queue_is_full(user_net):
    drv, dev, backend, _ = user_net
    from kvmkit_virtio_net.net import PENDING_LIMIT
    for _ in range(PENDING_LIMIT + 3):
        backend._from_slirp(b"\xff" * 6 + GUEST_MAC + b"\x08\x06" + bytes(28))
    assert dev.pending() == PENDING_LIMIT and dev.stats["rx_dropped"] == 3


# -- restricting what the guest reaches (threat model: plugins/virtio_net/README.md) -------
def _udp_to_host_loopback_arrives(s, timeout=1.0) -> bool:
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        host.bind(("127.0.0.1", port))
        host.settimeout(timeout)
        lease(s)
        s.input(udp_frame(b"knock", dport=port))
        try:
            return host.recvfrom(2048)[0] == b"knock"
        except TimeoutError:
            return False


@pytest.mark.parametrize("keys", [{"host_loopback": False}, {"outbound": False}])
def test_the_guest_can_be_kept_off_the_hosts_loopback(keys):
    got: list[bytes] = []
    s = slirp_mod.Slirp(got.append, **keys)
    s.frames = got
    try:
        assert not _udp_to_host_loopback_arrives(s)
    finally:
        s.close()


def test_without_outbound_dhcp_and_forwards_still_work():
    got: list[bytes] = []
    s = slirp_mod.Slirp(got.append, outbound=False)
    s.frames = got
    try:
        s.input(dhcp_frame(DHCP_DISCOVER))
        assert [d for d in map(parse_dhcp, got) if d][0]["yiaddr"] == "10.0.2.15"
        port = free_port(socket.SOCK_STREAM)
        s.add_forward(parse_forward(f"tcp:127.0.0.1:{port}-:22"))
        lease(s)
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            deadline = time.monotonic() + 5
            syn = None
            while syn is None and time.monotonic() < deadline:
                s.poll_once(100)
                syn = next((ip for ip in map(parse_ipv4, got)
                            if ip and ip["proto"] == 6 and ip.get("dport") == 22), None)
        assert syn is not None and syn["dst"] == "10.0.2.15"
    finally:
        s.close()


def test_the_keys_reach_slirp_and_are_user_only(monkeypatch):
    from kvmkit.plugin_api import DeviceError
    from kvmkit.testing import config
    from kvmkit_virtio_net import plugin as net_plugin
    seen = {}

    class Recorder:
        def __init__(self, **kw):
            seen.update(kw)

    monkeypatch.setattr("kvmkit_virtio_net.backends.UserBackend", Recorder)
    with FakeContext() as ctx:
        net_plugin.make_backend(config(net_plugin.SPEC, outbound=False, host_loopback=False), ctx)
    assert (seen["outbound"], seen["host_loopback"]) == (False, False)
    with pytest.raises(DeviceError, match="host_loopback is only for backend = \"user\""):
        net_plugin._check_keys(config(net_plugin.SPEC, backend="tap", ifname="t0",
                                      host_loopback=False))
