"""The routing agent's routes in the kernel: read and reconcile (I/O, pyroute2 messages).

Everything runs in the calling thread's network namespace (wrap calls in
`cni.netns.run_in_netns` for another one) over plain netlink sockets: no pyroute2 IPRoute, so
it is safe from any thread, including one running an asyncio loop. Only IPv4 routes of the main
table carrying the agent's protocol number (`ROUTE_PROTO`, 81) are ever changed; the CNI's
pod routes (proto 80), boot and kernel routes are read only to avoid overwriting them.

A Route's destination is its identity (metric 0, TOS 0): a route of another protocol already
holding that destination is reported as an error and left alone, as `replace` would otherwise
take it over. A route that cannot be programmed (device missing, gateway unreachable) is
reported in `RouteStats.errors`; the others still go in, and whatever the kernel held for that
destination before stays.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_GETLINK, RTM_GETROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from bgp.routes import ROUTE_PROTO, Route
from cni.netns import NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, Rtnl, messages

MAIN_TABLE = 254
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_NOWHERE = 0, 253, 255
RTNH_F_ONLINK = 4
TYPES = {1: "unicast", 6: "blackhole", 7: "unreachable", 8: "prohibit"}
TYPE_CODES = {name: code for code, name in TYPES.items()}
REPLACE = NLM_F_CREATE | NLM_F_REPLACE  # create or overwrite: never EEXIST
BATCH = 64  # requests per sendmsg: every answer must fit the socket's receive buffer

# netlink framing (linux/netlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_DUMP, NLM_F_DUMP_INTR = 0x300, 0x10
_HEADER = struct.Struct("=IHHII")  # length, type, flags, seq, pid
ANY_ERRNO = tuple(range(1, 512))  # batch requests report their errno instead of raising


@dataclass
class RouteStats:
    added: int = 0
    replaced: int = 0
    removed: int = 0
    unchanged: int = 0
    errors: list[str] = field(default_factory=list)


# -- dumps -------------------------------------------------------------------------------------


def dump(msg_class: Any, msg_type: int, **fields: Any) -> list[Any]:
    """Every object one RTM_GET* dump returns in the calling thread's namespace, decoded.
    A dump the kernel marks interrupted (the table changed meanwhile) is repeated."""
    for _ in range(10):
        items, interrupted = _dump_once(msg_class, msg_type, fields)
        if not interrupted:
            return items
    return items  # still changing under us: the last view is as good as any


def _dump_once(msg_class: Any, msg_type: int, fields: dict[str, Any]
               ) -> tuple[list[Any], bool]:
    request = msg_class()
    for key, value in fields.items():
        request[key] = value
    request["attrs"] = []
    request["header"]["type"] = msg_type
    request["header"]["flags"] = NLM_F_REQUEST | NLM_F_DUMP
    request["header"]["sequence_number"] = 1
    request.encode()
    items: list[Any] = []
    interrupted = False
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(10.0)  # the kernel always answers; this only bounds a bug
        sock.bind((0, 0))
        sock.send(bytes(request.data))
        while True:
            # a dump message never exceeds 32 KiB, whatever the buffer offered
            for msg_type_seen, flags, _seq, message in messages(sock.recv(1 << 16)):
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if msg_type_seen == NLMSG_DONE:
                    return items, interrupted
                if msg_type_seen == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", message, _HEADER.size)[0]
                    if code:
                        raise OSError(code, f"netlink dump: {os.strerror(code)}")
                    continue
                item = msg_class(message)
                item.decode()
                items.append(item)


def link_names() -> dict[int, str]:
    """ifindex -> name of every interface."""
    return {link["index"]: link.get("IFLA_IFNAME") for link in dump(ifinfmsg, RTM_GETLINK)}


# -- reading -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KernelRoute:
    route: Route
    proto: int
    priority: int
    tos: int

    @property
    def key(self) -> tuple[str, int, int]:
        return self.route.dst, self.priority, self.tos


def _main_v4(names: dict[int, str]) -> list[_KernelRoute]:
    out = []
    for msg in dump(rtmsg, RTM_GETROUTE, family=socket.AF_INET):
        if (msg.get("RTA_TABLE") or msg["table"]) != MAIN_TABLE:
            continue
        gateway = msg.get("RTA_GATEWAY")
        oif = msg.get("RTA_OIF")
        route = Route(dst=f"{msg.get('RTA_DST') or '0.0.0.0'}/{msg['dst_len']}",
                      type=TYPES.get(msg["type"], str(msg["type"])),
                      gateway=gateway or None,
                      dev=names.get(oif, str(oif)) if oif else None,
                      onlink=bool(msg["flags"] & RTNH_F_ONLINK))
        out.append(_KernelRoute(route, msg["proto"], msg.get("RTA_PRIORITY") or 0,
                                msg["tos"]))
    return out


def read_routes(proto: int = ROUTE_PROTO) -> set[Route]:
    """The main table's IPv4 routes with protocol `proto`, as Routes (dev always named)."""
    return {k.route for k in _main_v4(link_names()) if k.proto == proto}


# -- reconciling -------------------------------------------------------------------------------


def _matches(want: Route, have: Route) -> bool:
    """Whether the kernel's route is the wanted one (dev None: any device the kernel chose)."""
    return (want.type, want.gateway, want.onlink) == (have.type, have.gateway, have.onlink) \
        and (want.dev is None or want.dev == have.dev)


def reconcile_routes(desired: Iterable[Route], proto: int = ROUTE_PROTO) -> RouteStats:
    """Make the main table's IPv4 routes of protocol `proto` exactly `desired`; idempotent."""
    stats = RouteStats()
    names = link_names()
    indexes = {name: index for index, name in names.items()}
    ours: dict[tuple[str, int, int], _KernelRoute] = {}
    stale: list[_KernelRoute] = []
    foreign: dict[str, int] = {}  # destination -> protocol of another owner's route
    for kernel in _main_v4(names):
        if kernel.proto != proto:
            if (kernel.priority, kernel.tos) == (0, 0):
                foreign.setdefault(kernel.route.dst, kernel.proto)
        elif kernel.key in ours or (kernel.priority, kernel.tos) != (0, 0):
            stale.append(kernel)  # a duplicate or another metric: not a route we make
        else:
            ours[kernel.key] = kernel

    writes: list[tuple[Any, int, int, str, str]] = []  # msg, type, flags, label, outcome
    wanted: dict[str, Route] = {}
    for route in sorted(set(desired)):
        if route.dst in wanted:
            stats.errors.append(f"{route}: {wanted[route.dst]} has the same destination")
            continue
        wanted[route.dst] = route
        have = ours.get((route.dst, 0, 0))
        if have is not None and _matches(route, have.route):
            stats.unchanged += 1
            continue
        if route.dst in foreign:  # `replace` would take over the first route of that key
            stats.errors.append(f"{route}: the destination holds a route of protocol "
                                f"{foreign[route.dst]}; left alone")
            continue
        try:
            msg = _route_msg(route, proto, indexes)
        except ValueError as exc:
            stats.errors.append(f"{route}: {exc}")
            continue
        writes.append((msg, RTM_NEWROUTE, REPLACE, str(route),
                       "replaced" if have is not None else "added"))
    for kernel in list(ours.values()):
        if kernel.route.dst not in wanted:
            stale.append(kernel)
    for kernel in stale:
        writes.append((_delete_msg(kernel, proto), RTM_DELROUTE, 0, f"deleting {kernel.route}",
                       "removed"))

    with Rtnl() as nl:
        for start in range(0, len(writes), BATCH):
            chunk = writes[start:start + BATCH]
            for msg, msg_type, flags, label, _ in chunk:
                nl.queue(msg, msg_type, flags, label, ignore=ANY_ERRNO)
            for (_, msg_type, _, label, outcome), answer in zip(chunk, nl.commit(),
                                                                strict=True):
                if answer.error == errno.ESRCH and msg_type == RTM_DELROUTE:
                    continue  # gone already: what we wanted
                if answer.error:
                    stats.errors.append(f"{label}: {os.strerror(answer.error)}")
                else:
                    setattr(stats, outcome, getattr(stats, outcome) + 1)
    return stats


def _route_msg(route: Route, proto: int, indexes: dict[str, int]) -> Any:
    """An RTM_NEWROUTE message; ValueError for what no kernel would take."""
    kind = TYPE_CODES.get(route.type)
    if kind is None:
        raise ValueError(f"unknown route type {route.type!r}")
    net = ipaddress.ip_network(route.dst)
    if net.version != 4:
        raise ValueError("not an IPv4 destination")
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", MAIN_TABLE)]
    if net.prefixlen:
        attrs.append(("RTA_DST", str(net.network_address)))
    if route.dev is not None:
        if route.dev not in indexes:
            raise ValueError(f"device {route.dev} does not exist")
        attrs.append(("RTA_OIF", indexes[route.dev]))
    if route.gateway:
        attrs.append(("RTA_GATEWAY", route.gateway))
    # device-only unicast routes are link scope, as `ip route` makes them
    scope = RT_SCOPE_LINK if kind == 1 and route.dev and not route.gateway \
        else RT_SCOPE_UNIVERSE
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["dst_len"] = net.prefixlen
    msg["table"] = MAIN_TABLE
    msg["proto"] = proto
    msg["scope"] = scope
    msg["type"] = kind
    msg["flags"] = RTNH_F_ONLINK if route.onlink else 0
    msg["attrs"] = attrs
    return msg


def _delete_msg(kernel: _KernelRoute, proto: int) -> Any:
    """Deletes the first route with this destination, metric and TOS *of our protocol*: the
    kernel matches the protocol, so another owner's route of the same key is never hit."""
    net = ipaddress.ip_network(kernel.route.dst)
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", MAIN_TABLE)]
    if net.prefixlen:
        attrs.append(("RTA_DST", str(net.network_address)))
    if kernel.priority:
        attrs.append(("RTA_PRIORITY", kernel.priority))
    msg = rtmsg()
    msg["family"] = socket.AF_INET
    msg["dst_len"] = net.prefixlen
    msg["tos"] = kernel.tos
    msg["table"] = MAIN_TABLE
    msg["proto"] = proto
    msg["scope"] = RT_SCOPE_NOWHERE  # any scope
    msg["type"] = 0  # any type
    msg["attrs"] = attrs
    return msg
