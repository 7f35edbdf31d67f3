"""rtnetlink request bodies (everything after the nlmsghdr), packed with struct.

Every ADD sends about ten of these; pyroute2's message classes take 60 µs (a route) to 370 µs
(the veth pair) each to encode, these a few µs. Layouts and numbers are the kernel's uapi
(linux/rtnetlink.h, if_link.h, if_addr.h, neighbour.h, veth.h). Pure functions, no I/O.
"""

from __future__ import annotations

import socket
import struct

# attribute types
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINKINFO = 1, 3, 4, 18
IFLA_NET_NS_FD, IFLA_NUM_TX_QUEUES, IFLA_NUM_RX_QUEUES = 28, 31, 32
IFLA_INFO_KIND, IFLA_INFO_DATA, VETH_INFO_PEER = 1, 2, 1
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY = 1, 4, 5
NDA_DST, NDA_LLADDR = 1, 2

_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_NLA = struct.Struct("=HH")  # length, type
_U32 = struct.Struct("=I")


def attr(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the length field excludes the padding)."""
    length = _NLA.size + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def u32_attr(kind: int, value: int) -> bytes:
    return attr(kind, _U32.pack(value))


def name_attr(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def mac_bytes(mac: str) -> bytes:
    """'ee:ee:ee:ee:ee:ee' -> 6 bytes."""
    raw = bytes.fromhex(mac.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"{mac!r} is not a MAC address")
    return raw


def ip_bytes(family: int, ip: str) -> bytes:
    return socket.inet_pton(family, ip)


def link(index: int = 0, flags: int = 0, change: int = 0, attrs: bytes = b"") -> bytes:
    """An ifinfomsg (RTM_NEWLINK / GETLINK / DELLINK) with its attributes."""
    return _IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + attrs


def link_by_name(name: str) -> bytes:
    return link(attrs=name_attr(IFLA_IFNAME, name))


def veth_pair(host_name: str, host_mac: str, peer_name: str, peer_mac: str, peer_netns_fd: int,
              mtu: int, queues: int = 1) -> bytes:
    """RTM_NEWLINK for a veth pair whose peer is born in the namespace `peer_netns_fd`."""
    common = (u32_attr(IFLA_MTU, mtu) + u32_attr(IFLA_NUM_TX_QUEUES, queues)
              + u32_attr(IFLA_NUM_RX_QUEUES, queues))
    peer = link(attrs=name_attr(IFLA_IFNAME, peer_name) + u32_attr(IFLA_NET_NS_FD, peer_netns_fd)
                + attr(IFLA_ADDRESS, mac_bytes(peer_mac)) + common)
    info = name_attr(IFLA_INFO_KIND, "veth") + attr(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer))
    return link(attrs=name_attr(IFLA_IFNAME, host_name) + attr(IFLA_ADDRESS, mac_bytes(host_mac))
                + common + attr(IFLA_LINKINFO, info))


def address(family: int, index: int, ip: str, prefixlen: int, flags: int = 0) -> bytes:
    """An ifaddrmsg for RTM_NEWADDR: IFA_LOCAL and IFA_ADDRESS both the address."""
    raw = ip_bytes(family, ip)
    return (_IFADDRMSG.pack(family, prefixlen, flags, 0, index)
            + attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw))


def route(family: int, oif: int, dst: str | None, dst_len: int, gateway: str | None, *,
          table: int, proto: int, scope: int, route_type: int) -> bytes:
    """An rtmsg for RTM_NEWROUTE out of `oif`, to `dst`/`dst_len` (None: the default route)."""
    attrs = u32_attr(RTA_OIF, oif)
    if dst is not None and dst_len:
        attrs += attr(RTA_DST, ip_bytes(family, dst))
    if gateway:
        attrs += attr(RTA_GATEWAY, ip_bytes(family, gateway))
    return _RTMSG.pack(family, dst_len, 0, 0, table, proto, scope, route_type, 0) + attrs


def neighbour(family: int, index: int, ip: str, mac: str, state: int) -> bytes:
    """An ndmsg for RTM_NEWNEIGH: ip lladdr mac dev index."""
    return (_NDMSG.pack(family, index, state, 0, 0)
            + attr(NDA_DST, ip_bytes(family, ip)) + attr(NDA_LLADDR, mac_bytes(mac)))
