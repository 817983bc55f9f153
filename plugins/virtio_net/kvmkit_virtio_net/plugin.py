"""kvmkit plugin: the ``virtio-net`` device kind."""
from __future__ import annotations

from kvmkit.plugin_api import (QUEUE_KEY, DeviceConfig, DeviceContext, DeviceError, DevicePlugin,
                               DeviceSpec, Key)

from .forward import parse_forwards
from .mac import default_mac, format_mac, parse_mac
from .net import VirtioNet

KIND = "virtio-net"

SPEC = DeviceSpec(
    kind=KIND,
    summary="virtio network device on user-mode networking (libslirp) or a tap",
    keys=(
        Key("backend", str, "user",
            "\"user\": user-mode networking through libslirp, no privileges (the guest gets "
            "10.0.2.15 by DHCP, gateway and host 10.0.2.2, DNS 10.0.2.3); \"tap\": the tap "
            "device named by ifname",
            choices=("user", "tap")),
        Key("mac", str, None,
            "the guest's Ethernet address, e.g. \"52:54:00:12:34:56\"; default: a locally "
            "administered address derived from the machine name and the device's instance, "
            "the same on every run"),
        Key("mtu", int, 1500, "MTU the guest is told (VIRTIO_NET_F_MTU); larger frames are "
            "dropped and counted", min=68, max=65535),
        Key("ifname", str, None, "tap only, required there: the tap device to use"),
        Key("create", bool, False,
            "tap only: create the tap if it does not exist (needs CAP_NET_ADMIN; kvmkit sets "
            "its MTU, brings it up, and the tap disappears when kvmkit exits)"),
        Key("forward", list, [],
            "user only: host-to-guest port forwards, each \"PROTO:[HOSTADDR]:HOSTPORT-"
            "[GUESTADDR]:GUESTPORT\" (e.g. \"tcp:127.0.0.1:2222-:22\"); an empty HOSTADDR is "
            "127.0.0.1, an empty GUESTADDR the guest's DHCP address"),
        Key("outbound", bool, True,
            "user only: let the guest open connections to the host and beyond (NAT); false "
            "leaves it DHCP and the forward rules only (no DNS, no outbound traffic)"),
        Key("host_loopback", bool, True,
            "user only: 10.0.2.2 reaches the host's 127.0.0.1, so the guest can talk to every "
            "service listening on the host's loopback; false cuts that off"),
        QUEUE_KEY,
    ),
)


IFNAMSIZ = 16                   # a Linux interface name and its NUL


def key_problems(config: DeviceConfig) -> list[str]:
    """What is wrong with the keys, together (one line each)."""
    problems = []
    backend = config["backend"]
    if backend == "user":
        for key in ("ifname", "create"):
            if config[key] not in (None, False):
                problems.append(f"{key} is only for backend = \"tap\"; remove it or set "
                                "backend = \"tap\"")
        try:
            parse_forwards(config["forward"])
        except ValueError as e:
            problems.append(str(e))
        from .slirp import MTU_MAX, SlirpUnavailable, binding
        try:
            binding()                           # libslirp is there (loading it opens nothing)
        except SlirpUnavailable as e:
            problems.append(str(e))
        if config["mtu"] > MTU_MAX:
            problems.append(f"mtu {config['mtu']} is above what user-mode networking "
                            f"supports ({MTU_MAX})")
    else:
        if config["forward"]:
            problems.append("forward is only for backend = \"user\" (a tap has no port "
                            "forwards: the guest is on the tap's network)")
        for key in ("outbound", "host_loopback"):
            if config[key] is not True:
                problems.append(f"{key} is only for backend = \"user\" (what a tap's guest "
                                "reaches is up to the host's network set-up)")
        ifname = config["ifname"]
        if not ifname:
            problems.append("backend = \"tap\" needs ifname = \"NAME\", the tap device to use")
        elif (len(ifname.encode()) >= IFNAMSIZ or "/" in ifname or ifname in (".", "..")
              or any(c.isspace() or c in ":\0" for c in ifname)):
            problems.append(f"ifname {ifname!r} is not an interface name (at most {IFNAMSIZ - 1} "
                            "bytes, no '/', ':', spaces)")
    if config["mac"] is not None:
        try:
            parse_mac(config["mac"])
        except ValueError as e:
            problems.append(f"mac: {e}")
    return problems


def check(config: DeviceConfig, devices) -> list[str]:
    """``kvmkit_check_device``: the keys, and a tap or a MAC that an earlier
    NIC of this machine also has."""
    problems = key_problems(config)
    for other in devices:
        if other is config:
            break
        if other.kind != KIND:
            continue
        if (config["backend"] == "tap" and other["backend"] == "tap" and config["ifname"]
                and other["ifname"] == config["ifname"]):
            problems.append(f"ifname {config['ifname']!r} is also {other.table}'s tap; give each "
                            "NIC its own tap")
        if config["mac"] is not None and other["mac"] is not None:
            try:
                if parse_mac(other["mac"]) == parse_mac(config["mac"]):
                    problems.append(f"mac {config['mac']} is also {other.table}'s; give each NIC "
                                    "its own address")
            except ValueError:
                pass
    return problems


def _check_keys(config: DeviceConfig) -> None:
    problems = key_problems(config)
    if problems:
        raise DeviceError(problems[0])


def make_backend(config: DeviceConfig, ctx: DeviceContext):
    """The backend the table asks for; DeviceError if it cannot be had."""
    if config["backend"] == "user":
        from .backends import UserBackend
        from .slirp import MTU_MAX, SlirpError
        try:
            forwards = parse_forwards(config["forward"])
        except ValueError as e:
            raise DeviceError(str(e)) from None
        if config["mtu"] > MTU_MAX:
            raise DeviceError(f"mtu {config['mtu']} is above what user-mode networking "
                              f"supports ({MTU_MAX})")
        try:
            return UserBackend(spawn=ctx.spawn, log=ctx.log, mtu=config["mtu"],
                               forwards=forwards, hostname=ctx.machine_name,
                               outbound=config["outbound"], host_loopback=config["host_loopback"])
        except SlirpError as e:
            raise DeviceError(str(e)) from None
    from .backends import TapBackend
    from .tap import TapError, open_tap
    try:
        tap = open_tap(config["ifname"], create=config["create"], mtu=config["mtu"])
    except TapError as e:
        raise DeviceError(str(e)) from None
    try:
        host_mtu = tap.mtu()
        if host_mtu is not None and host_mtu > config["mtu"]:
            ctx.log.warning("%s: tap %s has MTU %d but the guest is told %d: larger frames from "
                            "the host are dropped (set mtu = %d)", ctx.name, tap.ifname, host_mtu,
                            config["mtu"], host_mtu)
        return TapBackend(tap, spawn=ctx.spawn, log=ctx.log)
    except BaseException:
        tap.close()
        raise


def factory(config: DeviceConfig, ctx: DeviceContext) -> VirtioNet:
    """Open the backend, build the model and hand it to the virtio transport."""
    _check_keys(config)
    if config["mac"] is None:
        mac = default_mac(ctx.machine_name, ctx.name)
    else:
        try:
            mac = parse_mac(config["mac"])
        except ValueError as e:
            raise DeviceError(f"mac: {e}") from None
    backend = make_backend(config, ctx)
    try:
        model = VirtioNet(backend, mac=mac, mtu=config["mtu"], log=ctx.log, name=ctx.name)
        ctx.add_virtio(model, queue=config["queue"])
    except BaseException:
        backend.close()
        raise
    ctx.log.info("%s: %s, MAC %s, MTU %d", ctx.name, backend, format_mac(mac), config["mtu"])
    return model


plugin = DevicePlugin(SPEC, factory, check)
