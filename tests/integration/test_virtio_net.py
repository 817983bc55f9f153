"""virtio-net under KVM, asserted on what the guest kernel does by itself.

Boot 1, user-mode networking (libslirp): ``ip=dhcp`` gets the kernel its
lease, ``netconsole=`` sends its log as UDP to 10.0.2.2, which slirp hands to
a listener on the host's loopback, and a TCP forward from a host port reaches
the guest kernel, whose reset (nothing listens) closes the host connection.

Boot 2, a tap in a network namespace the test creates: kvmkit runs inside
the namespace, the guest has a static address (``ip=...:off``), the host side
pings it and receives its netconsole log.

Boot 1 runs the kit's spinning /init, so the kernel stays up (and answers)
until the test stops the VM with SIGTERM.  Boot 2 (once per queue backend,
and once more with INTx) runs busybox: it fetches a file from the host over
HTTP and sends one back over TCP, and the bytes are compared; then the test
stops the VM with SIGTERM.  Files each way over user-mode networking are
test_userspace.py's.
"""
import os
import re
import signal
import socket
import threading
import time

import pytest

import guest
from guest import initrd_with_hooks, run_kvmkit
from transfer import Transfer
from requirement import need_module

pytestmark = pytest.mark.kvm

NETCONSOLE_SRC_PORT = 6665


def free_port(kind=socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UdpCollector:
    """Datagrams arriving at ``sock``, collected on a thread."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.datagrams: list[tuple[float, bytes, tuple]] = []
        self.sock.settimeout(0.5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(65536)
            except (socket.timeout, TimeoutError):
                continue
            except OSError:
                return
            self.datagrams.append((time.time(), data, peer))

    def text(self) -> str:
        return "".join(d.decode("utf-8", "replace") for _, d, _ in self.datagrams)

    def wait_for(self, needle: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return True
            time.sleep(0.2)
        return needle in self.text()

    def close(self):
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def machine_file(path, image, initrd, cmdline, net_table, name="net"):
    m = path / f"{name}.toml"
    m.write_text(f"""
[machine]
memory = "256M"
vcpus = 1

[kernel]
image = "{image}"
initrd = "{initrd}"
cmdline = "{cmdline}"

[[device]]
kind = "serial8250"

[[device]]
kind = "virtio-net"
{net_table}
""")
    return m


def require_slirp():
    from kvmkit_virtio_net import slirp
    try:
        slirp.binding()
    except slirp.SlirpUnavailable as e:
        if os.environ.get("KVMKIT_REQUIRE_KVM") == "1":
            pytest.fail(str(e))
        pytest.skip(str(e))


# -- boot 1: user-mode networking ---------------------------------------------------------------

@pytest.fixture(scope="module")
def user_boot(guest_kit, tmp_path_factory):
    require_slirp()
    d = tmp_path_factory.mktemp("net-user")
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    log_port = listener.getsockname()[1]
    collector = UdpCollector(listener)
    fwd_port = free_port(socket.SOCK_STREAM)
    cmdline = (f"console=ttyS0 panic=-1 ip=dhcp "
               f"netconsole={NETCONSOLE_SRC_PORT}@10.0.2.15/eth0,{log_port}@10.0.2.2/")
    m = machine_file(d, guest_kit["SMALL_VMLINUX"], guest_kit["SPIN_CPIO"], cmdline,
                     f'forward = ["tcp:127.0.0.1:{fwd_port}-:22"]', name="netuser")
    observed = {}

    def checks(proc):
        try:
            observed["netconsole"] = collector.wait_for("Run /init", 60)
            observed["forward"] = forward_answered(fwd_port)
        finally:
            proc.send_signal(signal.SIGTERM)

    try:
        result = run_kvmkit(["-v", "run", str(m)], timeout=900, when=r"Run /init as init process",
                            then=checks)
    finally:
        collector.close()
    print(result.describe())
    print("netconsole received:", repr(collector.text()[-2000:]))
    return result, collector, observed


def forward_answered(port: int, timeout: float = 60.0) -> str:
    """Connect to the forwarded port: slirp accepts at once and passes a SYN
    to the guest; the guest kernel (nothing listens on port 22) answers with
    a reset, and slirp closes the host side.  Without an answer slirp would
    keep the connection open, retransmitting, for far longer."""
    t0 = time.monotonic()
    try:
        conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        return f"connect failed: {e}"
    try:
        conn.settimeout(timeout)
        try:
            data = conn.recv(100)
        except ConnectionResetError:
            data = b""
        except (socket.timeout, TimeoutError):
            return f"still open after {timeout:.0f} s"
        return "closed" if data == b"" else f"got data {data!r}"
    finally:
        conn.close()
        print(f"forward check took {time.monotonic() - t0:.1f} s")


def test_dhcp_lease_from_slirp(user_boot):
    result, _, _ = user_boot
    assert result.find(r"IP-Config: Got DHCP answer from 10\.0\.2\.2, my address is 10\.0\.2\.15"), \
        result.describe()
    assert result.find(r"IP-Config: Complete"), result.describe()
    complete = result.find(r"device=eth0, hwaddr=([0-9a-f:]{17}), ipaddr=10\.0\.2\.15, "
                           r"mask=255\.255\.255\.0, gw=10\.0\.2\.2")
    assert complete, result.describe()
    from kvmkit_virtio_net.mac import default_mac, format_mac
    assert complete[1][1] == format_mac(default_mac("netuser", "virtio-net.0"))
    assert result.find(r"nameserver0=10\.0\.2\.3"), result.describe()


def test_netconsole_log_arrives_on_the_hosts_loopback(user_boot):
    result, collector, observed = user_boot
    assert observed.get("netconsole"), (collector.text()[-2000:], result.describe())
    text = collector.text()
    assert "IP-Config: Got DHCP answer from 10.0.2.2" in text
    assert all(peer[0] == "127.0.0.1" for _, _, peer in collector.datagrams)  # via slirp's NAT
    assert result.find(r"netconsole: network logging started"), result.describe()


def test_tcp_forward_reaches_the_guest_kernel(user_boot):
    result, _, observed = user_boot
    assert observed.get("forward") == "closed", (observed, result.describe())


def test_user_boot_ends_with_sigterm_and_a_clean_log(user_boot):
    result, _, _ = user_boot
    assert result.returncode == 143, result.describe()
    assert "Traceback" not in result.stderr
    assert re.search(r"virtio-net\.0: UserBackend\(slirp 4\.\d+\.\d+, 1 forwards\), MAC", result.stderr)
    assert "virtio-net.0: MSI-X enabled" in result.stderr


# -- boot 2: a tap in a network namespace ----------------------------------------------------------

SUBNET = "192.168.231"
HOST_IP, GUEST_IP = f"{SUBNET}.1", f"{SUBNET}.2"


@pytest.fixture(scope="module")
def netns():
    from kvmkit_virtio_net.netns import NetNamespace, available
    why = available()
    if why:
        if os.environ.get("KVMKIT_REQUIRE_KVM") == "1":
            pytest.fail(f"network namespaces are needed for the tap tests: {why}")
        pytest.skip(why)
    with NetNamespace() as ns:
        yield ns


# The tap boot runs on the native queue (its transmit queue on the C engine),
# once more with INTx (pci=nomsi: the engine's level irqfd and the Python
# receive path share the line), and on the pure-Python queue.
TAP_VARIANTS = [("native", ""), ("native", " pci=nomsi"), ("python", "")]


@pytest.fixture(scope="module", params=TAP_VARIANTS, ids=["native", "native-intx", "python"])
def tap_boot(guest_kit, netns, tmp_path_factory, request):
    from kvmkit_virtio_net.netns import ping
    queue, extra = request.param
    if queue == "native":
        need_module("kvmkit_native", "kvmkit-native")
    d = tmp_path_factory.mktemp("net-tap")
    ns = netns
    ns.ip("tuntap", "add", "dev", "kvtap0", "mode", "tap")
    ns.ip("addr", "add", f"{HOST_IP}/24", "dev", "kvtap0")
    ns.ip("link", "set", "kvtap0", "up")
    import json
    host_mac = json.loads(ns.ip("-j", "link", "show", "dev", "kvtap0"))[0]["address"]
    listener = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind((HOST_IP, 6666))
    collector = UdpCollector(listener)
    cmdline = (f"console=ttyS0 panic=-1 ip={GUEST_IP}::{HOST_IP}:255.255.255.0:kvmkit:eth0:off "
               f"netconsole={NETCONSOLE_SRC_PORT}@{GUEST_IP}/eth0,6666@{HOST_IP}/{host_mac}{extra}")
    xfer = Transfer(d, HOST_IP, ns.socket)
    initrd = initrd_with_hooks(guest_kit, d / "initrd.cpio", {"tap": xfer.hook(HOST_IP)})
    m = machine_file(d, guest_kit["SMALL_VMLINUX"], initrd, cmdline,
                     'backend = "tap"\nifname = "kvtap0"\nmac = "52:54:00:4b:56:4d"\n'
                     f'queue = "{queue}"', name="nettap")
    observed = {}

    def checks(proc):
        try:
            observed["rtts"] = ping(ns, GUEST_IP, count=3, timeout=60, interval=1.0)
            observed["netconsole"] = collector.wait_for("Run /init", 60)
            observed["transfer"] = xfer.wait(1200)      # the run's own deadline stops a hung guest
            observed["counters"] = ns.counters("kvtap0")
        finally:
            proc.send_signal(signal.SIGTERM)

    try:
        with pytest.MonkeyPatch.context() as mp:      # kvmkit runs inside the namespace
            mp.setattr(guest, "KVMKIT", ns.exec_prefix() + guest.KVMKIT)
            result = run_kvmkit(["-v", "run", str(m)], timeout=1200,
                                when=r"Run /init as init process", then=checks)
    finally:
        collector.close()
        xfer.close()
        ns.ip("link", "del", "kvtap0")        # the next variant makes its own
    print(result.describe())
    print("observed:", observed)
    return result, collector, observed, request.param, xfer


def test_transmit_runs_where_the_queue_key_says(tap_boot):
    result, _, _, (queue, extra), _ = tap_boot
    engine = re.search(r"the transmit queue runs on the native engine's C thread \((\S+)\)",
                       result.stderr)
    if queue == "native":
        assert engine and engine.group(1) == ("INTx" if "nomsi" in extra else "MSI-X"), \
            result.describe()
    else:
        assert engine is None and "virtqueues: python (" in result.stderr, result.describe()


def test_guest_kernel_configures_its_static_address(tap_boot):
    result, *_ = tap_boot
    assert result.find(rf"device=eth0, hwaddr=52:54:00:4b:56:4d, ipaddr={re.escape(GUEST_IP)}"), \
        result.describe()


def test_host_pings_the_guest_kernel_over_the_tap(tap_boot):
    result, _, observed, _, _ = tap_boot
    rtts = observed.get("rtts")
    assert rtts and len(rtts) == 3, (observed, result.describe())


def test_netconsole_over_the_tap(tap_boot):
    result, collector, observed, _, _ = tap_boot
    assert observed.get("netconsole"), (collector.text()[-2000:], result.describe())
    assert all(peer == (GUEST_IP, NETCONSOLE_SRC_PORT) for _, _, peer in collector.datagrams)
    assert "Run /init as init process" in collector.text()


def test_tap_boot_ends_cleanly(tap_boot):
    result, _, observed, _, _ = tap_boot
    assert result.returncode == 143, result.describe()
    assert "Traceback" not in result.stderr
    assert "TapBackend('kvtap0')" in result.stderr
    counters = observed["counters"]
    assert counters["tx_packets"] >= 3 and counters["rx_packets"] >= 3   # pings and answers


# -- files both ways over the tap (over slirp: test_userspace.py) ----------------------------------
def test_files_both_ways_over_the_tap(tap_boot):
    result, _, observed, _, xfer = tap_boot
    assert observed.get("transfer"), (observed, result.describe())
    xfer.check(result)
