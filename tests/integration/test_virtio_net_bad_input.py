"""virtio-net bad input through the kvmkit command: one clear line naming the
file, the device and what to do, exit status 2, no traceback.

The device is created after the VM, so these need /dev/kvm and a kernel
kvmkit accepts (the kit's), though no guest runs."""
import os
import shutil
import socket
import subprocess
import sys

import pytest

from guest import one_error_line as guest_one_error_line
from requirement import need

KVMKIT = [sys.executable, "-m", "kvmkit"]


pytestmark = pytest.mark.kvm


@pytest.fixture
def machine(guest_kit, tmp_path):
    def make(net_table: str):
        m = tmp_path / "netbad.toml"
        m.write_text(f'[kernel]\nimage = "{guest_kit["SMALL_VMLINUX"]}"\n\n'
                     f'[[device]]\nkind = "virtio-net"\n{net_table}\n')
        return m
    return make


def kvmkit(args, prefix=(), python_code=None):
    cmd = list(prefix)
    if python_code:
        cmd += [sys.executable, "-c", python_code]
    else:
        cmd += KVMKIT
    return subprocess.run(cmd + list(args), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=120)


def one_error_line(result, *needles):
    return guest_one_error_line(result, *needles, status=2)


def test_malformed_forward_rule(machine):
    m = machine('forward = ["tcp::2222-:22", "tcp:2222:22"]')
    one_error_line(kvmkit(["run", str(m)]), str(m), "device[0] (virtio-net)",
                   "forward[1]: 'tcp:2222:22' is not a forward rule",
                   "PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT")


def test_forward_port_already_in_use(machine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        m = machine(f'forward = ["tcp::{port}-:22"]')
        one_error_line(kvmkit(["run", str(m)]), "device[0] (virtio-net)",
                       f"cannot listen on 127.0.0.1:{port} (tcp): Address already in use")


def test_libslirp_not_installed(machine):
    m = machine("")
    hide = ("import sys; sys.modules['kvmkit_virtio_net._slirp'] = None\n"
            "from kvmkit.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    one_error_line(kvmkit(["run", str(m)], python_code=hide), "device[0] (virtio-net)",
                   "libslirp is not available", "apt-get install libslirp0 libslirp-dev")


def test_missing_tap(machine):
    m = machine('backend = "tap"\nifname = "kvmkit-none0"')
    one_error_line(kvmkit(["run", str(m)]), "device[0] (virtio-net)",
                   "tap device 'kvmkit-none0' does not exist",
                   "ip tuntap add dev kvmkit-none0 mode tap")


def test_tap_without_ifname(machine):
    m = machine('backend = "tap"')
    one_error_line(kvmkit(["run", str(m)]), "backend = \"tap\" needs ifname")


def _setpriv():
    need(shutil.which("setpriv") is not None, "setpriv (util-linux) is not installed")
    need(os.geteuid() == 0, "the test drops CAP_NET_ADMIN from root; run as root")
    return ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-net_admin"]


def test_creating_a_tap_without_cap_net_admin(machine):
    prefix = _setpriv()
    m = machine('backend = "tap"\nifname = "kvmkit-new0"\ncreate = true')
    one_error_line(kvmkit(["run", str(m)], prefix=prefix), "device[0] (virtio-net)",
                   "permission denied: creating a tap needs CAP_NET_ADMIN")


def test_another_users_tap_without_cap_net_admin(machine):
    prefix = _setpriv()
    from kvmkit_virtio_net.netns import NetNamespace, available
    why = available()
    need(not why, f"network namespaces are needed: {why}")
    with NetNamespace() as ns:
        ns.ip("tuntap", "add", "dev", "kvtap9", "mode", "tap", "user", "65534")
        m = machine('backend = "tap"\nifname = "kvtap9"')
        one_error_line(kvmkit(["run", str(m)], prefix=ns.exec_prefix() + prefix),
                       "device[0] (virtio-net)", "tap device 'kvtap9': permission denied",
                       "needs CAP_NET_ADMIN")
