"""The virtio-net header, the configuration space and the checksum helper,
and how the device treats headers on transmit and receive."""
import struct

import pytest

from netdriver import MAC, frame_item
from kvmkit_virtio_net import protocol as p
from kvmkit_virtio_net.checksum import complete_checksum, internet_checksum, ones_complement_sum
from kvmkit_virtio_net.net import VirtioNet
from netframes import parse_ipv4, udp_frame

# -- formats ------------------------------------------------------------------------------------


def test_header_layout_is_virtio_net_hdr_v1():
    hdr = p.NetHeader(flags=1, gso_type=p.GSO_TCPV4, hdr_len=54, gso_size=1448, csum_start=34,
                      csum_offset=16, num_buffers=3)
    raw = hdr.pack()
    assert len(raw) == p.HDR_SIZE == 12
    assert raw == bytes([1, 1]) + struct.pack("<HHHHH", 54, 1448, 34, 16, 3)
    assert p.NetHeader.unpack(raw) == hdr
    assert hdr.needs_csum and hdr.gso == p.GSO_TCPV4
    assert p.NetHeader(gso_type=p.GSO_TCPV6 | p.GSO_ECN).gso == p.GSO_TCPV6


def test_config_space(make_net):
    _, dev, _ = make_net(mtu=9000)
    cfg = dev.config_bytes()
    assert len(cfg) == 12
    assert cfg[:6] == MAC
    assert struct.unpack_from("<HHH", cfg, 6) == (p.S_LINK_UP, 1, 9000)   # status, pairs, mtu
    assert dev.config_read(0, 4) == int.from_bytes(MAC[:4], "little")
    assert dev.config_read(10, 2) == 9000
    assert dev.config_read(12, 4) == 0
    dev.config_write(0, 4, 0)                               # read-only
    assert dev.config_bytes()[:6] == MAC


def test_identity_and_features(make_net):
    _, dev, _ = make_net(offloads=p.bits(p.F_CSUM, p.F_GUEST_CSUM) | (1 << 40))
    assert (dev.device_id, dev.pci_class, tuple(dev.queue_sizes)) == (1, 0x020000, (256, 256, 64))
    for bit in (p.F_MAC, p.F_MTU, p.F_STATUS, p.F_MRG_RXBUF, p.F_CTRL_VQ, p.F_CTRL_MAC_ADDR,
                p.F_CSUM, p.F_GUEST_CSUM):
        assert dev.features >> bit & 1, bit
    assert not dev.features & (1 << 40)                     # only offload bits from the backend
    assert not dev.features & p.bits(p.F_HOST_TSO4, p.F_GUEST_TSO4, 18)   # no CTRL_RX


# -- the checksum ----------------------------------------------------------------------------------

def test_rfc1071_example_and_odd_lengths():
    data = bytes.fromhex("0001f203f4f5f6f7")            # RFC 1071, 3.: the sum is ddf2
    assert ones_complement_sum(data) == 0xDDF2
    assert internet_checksum(data) == 0x220D
    assert ones_complement_sum(b"\x01") == 0x0100
    assert ones_complement_sum(b"") == 0
    assert ones_complement_sum(b"\xff\xff\xff\xff") == 0xFFFF
    assert ones_complement_sum(b"\x80\x00\x80\x00") == 0x0001    # end-around carry


def test_complete_checksum_finishes_a_partial_udp_checksum():
    frame = bytearray(udp_frame(b"hello, partial checksum"))
    good = bytes(frame)
    # What a guest leaves with NEEDS_CSUM: the pseudo-header sum, not complemented.
    pseudo = bytes(frame[26:34]) + struct.pack("!BBH", 0, 17, len(frame) - 34)
    frame[40:42] = ones_complement_sum(pseudo).to_bytes(2, "big")
    complete_checksum(frame, 34, 6)
    assert bytes(frame) == good
    assert parse_ipv4(bytes(frame))["l4_checksum_ok"]
    with pytest.raises(ValueError, match="outside"):
        complete_checksum(frame, len(frame) - 4, 6)


def test_a_zero_result_is_written_as_ffff():
    frame = bytearray(b"\xff\xff\x00\x00")      # sum 0xffff -> checksum 0
    complete_checksum(frame, 0, 2)
    assert frame[2:] == b"\xff\xff"


# -- headers on transmit -------------------------------------------------------------------------

FRAME = udp_frame(b"x" * 100)
BASE = VirtioNet.BASE_FEATURES         # what a driver without offloads negotiates


def test_plain_frame_goes_out_with_a_clean_header(make_net):
    drv, dev, backend = make_net()
    used = drv.send(FRAME, p.NetHeader(num_buffers=7))
    assert len(used) == 1 and used[0][1] == 0               # nothing written into TX chains
    [(hdr, data)] = backend.sent
    assert data == FRAME and hdr == p.NetHeader()           # num_buffers is not passed on
    assert dev.stats["tx_frames"] == 1 and dev.stats["tx_bytes"] == len(FRAME)


def test_header_and_frame_in_separate_descriptors(make_net):
    drv, _, backend = make_net()
    drv.send(FRAME, split=True)
    assert backend.sent[0][1] == FRAME


PARTIAL = p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6)
GSO = p.NetHeader(flags=p.HDR_F_NEEDS_CSUM, gso_type=p.GSO_TCPV4, hdr_len=54, gso_size=1448,
                  csum_start=34, csum_offset=16)


@pytest.mark.parametrize("offloads,hdr,size,ok,stat", [
    (p.bits(p.F_CSUM), PARTIAL, 200, True, None),
    (0, PARTIAL, 200, False, "tx_errors"),                       # CSUM not negotiated
    (p.bits(p.F_CSUM), PARTIAL.replace(csum_start=193), 200, False, "tx_errors"),  # outside
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO, 30000, True, None),
    (p.bits(p.F_CSUM), GSO, 30000, False, "tx_errors"),          # HOST_TSO4 not negotiated
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO.replace(gso_type=p.GSO_TCPV4 | p.GSO_ECN), 3000,
     False, "tx_errors"),                                        # ECN without HOST_ECN
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO.replace(gso_size=0), 3000, False, "tx_errors"),
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO.replace(flags=0), 3000, False, "tx_errors"),
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), p.NetHeader(gso_type=9), 200, False, "tx_errors"),
    (0, p.NetHeader(), 1518, True, None),                        # MTU + Ethernet + VLAN tag
    (0, p.NetHeader(), 1519, False, "tx_oversize"),
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO, p.MAX_GSO_FRAME, True, None),
    (p.bits(p.F_CSUM, p.F_HOST_TSO4), GSO, p.MAX_GSO_FRAME + 1, False, "tx_oversize"),
    (0, p.NetHeader(), 13, False, "tx_errors"),                  # shorter than an Ethernet header
])
def test_transmit_header_checks(make_net, offloads, hdr, size, ok, stat):
    drv, dev, backend = make_net(offloads=offloads)
    frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
    used = drv.send(frame, hdr)
    assert len(used) == 1                                   # the chain is returned either way
    assert bool(backend.sent) == ok
    if ok:
        assert backend.sent[0] == (hdr, frame)
    else:
        assert dev.stats[stat] == 1 and dev.stats["tx_frames"] == 0


def test_transmit_passes_on_no_flag_but_needs_csum(make_net):
    drv, _, backend = make_net(offloads=p.bits(p.F_CSUM))
    drv.send(FRAME, p.NetHeader(flags=p.HDR_F_DATA_VALID | 4))   # a guest vouching, RSC_INFO
    drv.send(FRAME, PARTIAL.replace(flags=p.HDR_F_NEEDS_CSUM | p.HDR_F_DATA_VALID))
    assert [h for h, _ in backend.sent] == [p.NetHeader(), PARTIAL]


def test_a_chain_without_a_whole_header_is_dropped(make_net):
    drv, dev, backend = make_net()
    drv.queue_tx(b"", raw=b"\0" * 11)
    dev.process(p.TX)
    assert len(drv.drv[p.TX].used()) == 1
    assert not backend.sent and dev.stats["tx_errors"] == 1


def test_backend_errors_are_counted_not_raised(make_net, caplog):
    drv, dev, backend = make_net()
    backend.fail = OSError(5, "Input/output error")
    drv.send(FRAME)
    drv.send(FRAME)
    assert dev.stats["tx_errors"] == 2
    logged = [r for r in caplog.records if "tx_errors" in r.getMessage()]
    assert len(logged) == 1 and "Input/output error" in logged[0].getMessage()


# -- headers on receive ---------------------------------------------------------------------------

def test_received_frame_gets_num_buffers_and_no_flags_without_guest_csum(make_net):
    drv, dev, _ = make_net(rx_checksums_valid=True, offloads=p.bits(p.F_GUEST_CSUM),
                           features=BASE)
    drv.post_rx(1)
    dev.deliver(frame_item(FRAME, p.NetHeader(flags=p.HDR_F_DATA_VALID, num_buffers=9)))
    [(hdr, data, n)] = drv.run_rx()
    assert data == FRAME and n == 1
    assert hdr == p.NetHeader(num_buffers=1)                # 5.1.6.4.1: flags 0 without GUEST_CSUM


def test_data_valid_when_the_backend_vouches_and_guest_csum(make_net):
    drv, dev, _ = make_net(rx_checksums_valid=True, offloads=p.bits(p.F_GUEST_CSUM))
    drv.post_rx(1)
    dev.deliver(frame_item(FRAME))
    [(hdr, _, _)] = drv.run_rx()
    assert hdr.flags == p.HDR_F_DATA_VALID


def test_partial_checksum_passes_to_a_guest_that_takes_it(make_net):
    drv, dev, _ = make_net(offloads=p.bits(p.F_GUEST_CSUM))
    drv.post_rx(1)
    dev.deliver(frame_item(FRAME, PARTIAL))
    [(hdr, data, _)] = drv.run_rx()
    assert hdr.flags == p.HDR_F_NEEDS_CSUM and (hdr.csum_start, hdr.csum_offset) == (34, 6)
    assert data == FRAME


def test_partial_checksum_is_finished_for_a_guest_without_guest_csum(make_net):
    drv, dev, _ = make_net(offloads=p.bits(p.F_GUEST_CSUM), features=BASE)
    partial = bytearray(FRAME)
    partial[40:42] = b"\0\0"
    pseudo = bytes(partial[26:34]) + struct.pack("!BBH", 0, 17, len(partial) - 34)
    partial[40:42] = ones_complement_sum(pseudo).to_bytes(2, "big")
    drv.post_rx(1)
    dev.deliver(frame_item(bytes(partial), PARTIAL))
    [(hdr, data, _)] = drv.run_rx()
    assert hdr.flags == 0 and data == FRAME and parse_ipv4(data)["l4_checksum_ok"]


@pytest.mark.parametrize("negotiate,hdr,ok", [
    (p.bits(p.F_GUEST_CSUM, p.F_GUEST_TSO4), GSO, True),
    (p.bits(p.F_GUEST_CSUM), GSO, False),
    (p.bits(p.F_GUEST_CSUM, p.F_GUEST_TSO4), GSO.replace(gso_type=p.GSO_TCPV4 | p.GSO_ECN), False),
    (p.bits(p.F_GUEST_CSUM, p.F_GUEST_TSO4), GSO.replace(flags=0), False),
    (p.bits(p.F_GUEST_CSUM, p.F_GUEST_TSO4), p.NetHeader(gso_type=5), False),
])
def test_received_gso_needs_the_guest_feature(make_net, negotiate, hdr, ok):
    drv, dev, _ = make_net(offloads=p.GUEST_OFFLOADS, features=BASE | negotiate)
    drv.post_rx(40, size=4096)
    frame = bytes(3000)
    dev.deliver(frame_item(frame, hdr))
    got = drv.run_rx()
    if ok:
        assert len(got) == 1 and got[0][0].gso_type == hdr.gso_type and got[0][1] == frame
    else:
        assert got == [] and dev.stats["rx_errors"] == 1
    assert dev.pending() == 0
