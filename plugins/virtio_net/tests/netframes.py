"""Ethernet/ARP/IPv4/UDP/TCP/DHCP frames for the tests, built and parsed by hand."""
from __future__ import annotations

import socket
import struct

from kvmkit_virtio_net.checksum import internet_checksum

BROADCAST = b"\xff" * 6
ETH_IP, ETH_ARP = 0x0800, 0x0806
GUEST_MAC = bytes.fromhex("020000c0ffee")


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, proto: int, payload: bytes, ident: int = 1) -> bytes:
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident, 0, 64, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst))
    head = head[:10] + struct.pack("!H", internet_checksum(head)) + head[12:]
    return head + payload


def pseudo_sum_header(src: str, dst: str, proto: int, length: int) -> bytes:
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, proto, length)


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes, checksum: bool = True) -> bytes:
    seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if checksum:
        c = internet_checksum(pseudo_sum_header(src, dst, 17, len(seg)) + seg) or 0xFFFF
        seg = seg[:6] + struct.pack("!H", c) + seg[8:]
    return seg


def tcp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"", *, seq: int = 1,
        ack: int = 0, flags: int = 0x18, window: int = 65535) -> bytes:
    seg = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0) + payload
    c = internet_checksum(pseudo_sum_header(src, dst, 6, len(seg)) + seg)
    return seg[:16] + struct.pack("!H", c) + seg[18:]


def udp_frame(payload: bytes, *, src="10.0.2.15", dst="10.0.2.2", sport=6665, dport=6666,
              mac=GUEST_MAC, dst_mac=BROADCAST) -> bytes:
    return ethernet(dst_mac, mac, ETH_IP, ipv4(src, dst, 17, udp(src, dst, sport, dport, payload)))


def arp_request(sender_mac: bytes, sender_ip: str, target_ip: str) -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, ETH_IP, 6, 4, 1, sender_mac,
                       socket.inet_aton(sender_ip), bytes(6), socket.inet_aton(target_ip))
    return ethernet(BROADCAST, sender_mac, ETH_ARP, body)


def parse_arp(frame: bytes) -> dict | None:
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_ARP:
        return None
    _, _, _, _, op, smac, sip, tmac, tip = struct.unpack_from("!HHBBH6s4s6s4s", frame, 14)
    return {"op": op, "sender_mac": smac, "sender_ip": socket.inet_ntoa(sip),
            "target_mac": tmac, "target_ip": socket.inet_ntoa(tip)}


DHCP_DISCOVER, DHCP_OFFER, DHCP_REQUEST, DHCP_ACK = 1, 2, 3, 5


def dhcp_frame(msg_type: int, mac: bytes = GUEST_MAC, xid: int = 0x4B564D4B,
               requested: str | None = None, server: str | None = None) -> bytes:
    """A DHCP client message (DISCOVER or REQUEST) broadcast from 0.0.0.0."""
    bootp = struct.pack("!BBBBIHHIIII16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, 0, 0, 0, 0,
                        mac, b"", b"")
    options = bytes.fromhex("63825363") + bytes((53, 1, msg_type))
    if requested:
        options += bytes((50, 4)) + socket.inet_aton(requested)
    if server:
        options += bytes((54, 4)) + socket.inet_aton(server)
    options += b"\xff"
    return ethernet(BROADCAST, mac, ETH_IP,
                    ipv4("0.0.0.0", "255.255.255.255", 17,
                         udp("0.0.0.0", "255.255.255.255", 68, 67, bootp + options)))


def parse_ipv4(frame: bytes) -> dict | None:
    """Ethernet + IPv4 (+ UDP/TCP ports): a dict, or None for other frames."""
    if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != ETH_IP:
        return None
    ihl = (frame[14] & 0xF) * 4
    total = struct.unpack_from("!H", frame, 16)[0]
    ip = frame[14:14 + total]
    out = {"dst_mac": frame[:6], "src_mac": frame[6:12], "proto": ip[9],
           "src": socket.inet_ntoa(ip[12:16]), "dst": socket.inet_ntoa(ip[16:20]),
           "ip_checksum_ok": internet_checksum(ip[:ihl]) == 0, "l4": ip[ihl:]}
    l4 = out["l4"]
    if out["proto"] in (6, 17) and len(l4) >= 8:
        out["sport"], out["dport"] = struct.unpack_from("!HH", l4, 0)
        pseudo = pseudo_sum_header(out["src"], out["dst"], out["proto"], len(l4))
        out["l4_checksum_ok"] = internet_checksum(pseudo + l4) == 0
        if out["proto"] == 17:
            out["payload"] = l4[8:]
        else:
            out["tcp_flags"] = l4[13]
            out["payload"] = l4[(l4[12] >> 4) * 4:]
    return out


def parse_dhcp(frame: bytes) -> dict | None:
    ip = parse_ipv4(frame)
    if not ip or ip["proto"] != 17 or ip.get("sport") != 67:
        return None
    bootp = ip["payload"]
    options, i = {}, 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        code, n = bootp[i], bootp[i + 1]
        options[code] = bootp[i + 2:i + 2 + n]
        i += 2 + n
    return {"op": bootp[0], "xid": struct.unpack_from("!I", bootp, 4)[0],
            "yiaddr": socket.inet_ntoa(bootp[16:20]), "type": options.get(53, b"\0")[0],
            "router": socket.inet_ntoa(options[3][:4]) if 3 in options else None,
            "dns": socket.inet_ntoa(options[6][:4]) if 6 in options else None,
            "mask": socket.inet_ntoa(options[1]) if 1 in options else None}
