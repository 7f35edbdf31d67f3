"""cni.rtnl_msgs packs the same bytes pyroute2's message classes encode for the same request
(pyroute2 is the reference here; the kernel tests in tests/integration/test_plumbing.py check
that the requests do what they should)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from cni import rtnl_msgs as msgs

HEADER = 16  # nlmsghdr, which Rtnl adds


def pyroute2_body(cls: Any, attrs: list[tuple[str, Any]], **fields: Any) -> bytes:
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)[HEADER:]


def test_veth_pair() -> None:
    queues = [("IFLA_NUM_TX_QUEUES", 1), ("IFLA_NUM_RX_QUEUES", 1)]
    peer = {"attrs": [("IFLA_IFNAME", "eth0"), ("IFLA_NET_NS_FD", 7),
                      ("IFLA_ADDRESS", "02:42:0a:f4:00:05"), ("IFLA_MTU", 1440), *queues]}
    info = {"attrs": [("IFLA_INFO_KIND", "veth"),
                      ("IFLA_INFO_DATA", {"attrs": [("VETH_INFO_PEER", peer)]})]}
    want = pyroute2_body(ifinfmsg, [("IFLA_IFNAME", "cali0123456789a"),
                                    ("IFLA_ADDRESS", "ee:ee:ee:ee:ee:ee"), ("IFLA_MTU", 1440),
                                    *queues, ("IFLA_LINKINFO", info)])
    assert msgs.veth_pair("cali0123456789a", "ee:ee:ee:ee:ee:ee", "eth0", "02:42:0a:f4:00:05",
                          7, 1440) == want


def test_links() -> None:
    assert msgs.link_by_name("eth0") == pyroute2_body(ifinfmsg, [("IFLA_IFNAME", "eth0")])
    assert msgs.link(12, flags=1, change=1) == pyroute2_body(ifinfmsg, [], index=12, flags=1,
                                                             change=1)
    assert msgs.link(3) == pyroute2_body(ifinfmsg, [], index=3)
    assert msgs.link(3, attrs=msgs.attr(msgs.IFLA_ADDRESS, msgs.mac_bytes("0a:58:0a:41:00:05"))
                     ) == pyroute2_body(ifinfmsg, [("IFLA_ADDRESS", "0a:58:0a:41:00:05")], index=3)


def test_addresses() -> None:
    for family, ip, plen in ((socket.AF_INET, "10.244.0.5", 32),
                             (socket.AF_INET6, "fd00:10:244::5", 128),
                             (socket.AF_INET6, "fe80::ecee:eeff:feee:eeee", 64)):
        assert msgs.address(family, 9, ip, plen, 0x02) == pyroute2_body(
            ifaddrmsg, [("IFA_LOCAL", ip), ("IFA_ADDRESS", ip)], family=family, prefixlen=plen,
            flags=0x02, index=9)


def test_routes() -> None:
    common = {"table": 254, "type": 1}
    assert msgs.route(socket.AF_INET, 4, "10.244.0.5", 32, None, table=254, proto=80, scope=253,
                      route_type=1) == pyroute2_body(
        rtmsg, [("RTA_OIF", 4), ("RTA_DST", "10.244.0.5")], family=socket.AF_INET, dst_len=32,
        proto=80, scope=253, **common)
    assert msgs.route(socket.AF_INET, 4, "0.0.0.0", 0, "169.254.1.1", table=254, proto=4,
                      scope=0, route_type=1) == pyroute2_body(
        rtmsg, [("RTA_OIF", 4), ("RTA_GATEWAY", "169.254.1.1")], family=socket.AF_INET,
        dst_len=0, proto=4, scope=0, **common)
    assert msgs.route(socket.AF_INET6, 2, "::", 0, "fe80::ecee:eeff:feee:eeee", table=254,
                      proto=4, scope=0, route_type=1) == pyroute2_body(
        rtmsg, [("RTA_OIF", 2), ("RTA_GATEWAY", "fe80::ecee:eeff:feee:eeee")],
        family=socket.AF_INET6, dst_len=0, proto=4, scope=0, **common)


def test_neighbour() -> None:
    assert msgs.neighbour(socket.AF_INET, 6, "10.244.0.5", "0a:58:0a:41:00:05", 0x80) == \
        pyroute2_body(ndmsg, [("NDA_DST", "10.244.0.5"), ("NDA_LLADDR", "0a:58:0a:41:00:05")],
                      family=socket.AF_INET, ifindex=6, state=0x80)


def test_attribute_padding() -> None:
    assert msgs.attr(1, b"abcde") == b"\x09\x00\x01\x00abcde\x00\x00\x00"
    assert msgs.name_attr(3, "eth0") == b"\x09\x00\x03\x00eth0\x00\x00\x00\x00"
    with pytest.raises(ValueError, match="not a MAC"):
        msgs.mac_bytes("ee:ee")
