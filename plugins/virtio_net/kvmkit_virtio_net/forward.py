"""Host-to-guest port forwards of user-mode networking: the ``forward`` key.

A rule is ``PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT``, for example
``tcp:127.0.0.1:2222-:22`` or ``udp::5353-10.0.2.15:53``.  PROTO is tcp or
udp; an empty HOSTADDR is 127.0.0.1 (only this host can connect; write
0.0.0.0 to listen on every address); an empty GUESTADDR is the address the
guest gets by DHCP.  IPv4 only.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import re

__all__ = ["Forward", "parse_forward", "parse_forwards", "DEFAULT_HOST_ADDR"]

DEFAULT_HOST_ADDR = "127.0.0.1"
_RULE = re.compile(r"^(?P<proto>[A-Za-z]+):(?P<haddr>[^:\-]*):(?P<hport>[^:\-]*)"
                   r"-(?P<gaddr>[^:\-]*):(?P<gport>[^:\-]*)$")
SYNTAX = "PROTO:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT, e.g. tcp:127.0.0.1:2222-:22"


@dataclasses.dataclass(frozen=True)
class Forward:
    proto: str                  # "tcp" or "udp"
    host_addr: str              # dotted IPv4
    host_port: int
    guest_addr: str | None      # None: the guest's DHCP address
    guest_port: int

    @property
    def udp(self) -> bool:
        return self.proto == "udp"

    def __str__(self) -> str:
        return (f"{self.proto}:{self.host_addr}:{self.host_port}-"
                f"{self.guest_addr or ''}:{self.guest_port}")


def _port(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a port number (1-65535)" if text
                         else f"{what} is missing")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{what} {port} is not in 1-65535")
    return port


def _addr(text: str, what: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IPv4 address") from None


def parse_forward(rule: str) -> Forward:
    """One rule; ValueError says what is wrong with it."""
    if not isinstance(rule, str):
        raise ValueError(f"{rule!r} is not a string; write {SYNTAX}")
    m = _RULE.match(rule.strip())
    if not m:
        raise ValueError(f"{rule!r} is not a forward rule; write {SYNTAX}")
    proto = m["proto"].lower()
    if proto not in ("tcp", "udp"):
        raise ValueError(f"{rule!r}: protocol {m['proto']!r} is not tcp or udp")
    host_addr = _addr(m["haddr"], "host address") if m["haddr"] else DEFAULT_HOST_ADDR
    guest_addr = _addr(m["gaddr"], "guest address") if m["gaddr"] else None
    try:
        host_port = _port(m["hport"], "host port")
        guest_port = _port(m["gport"], "guest port")
    except ValueError as e:
        raise ValueError(f"{rule!r}: {e}") from None
    return Forward(proto, host_addr, host_port, guest_addr, guest_port)


def parse_forwards(rules) -> list[Forward]:
    """Every rule of the ``forward`` list; ValueError names the rule by index
    (``forward[1] ...``), also for two rules on one host port."""
    out: list[Forward] = []
    seen: dict[tuple[str, str, int], int] = {}
    for i, rule in enumerate(rules):
        try:
            fwd = parse_forward(rule)
        except ValueError as e:
            raise ValueError(f"forward[{i}]: {e}") from None
        key = (fwd.proto, fwd.host_addr, fwd.host_port)
        if key in seen:
            raise ValueError(f"forward[{i}] {rule!r}: {fwd.proto} port {fwd.host_port} on "
                             f"{fwd.host_addr} is already forwarded by forward[{seen[key]}]")
        seen[key] = i
        out.append(fwd)
    return out
