"""The VXLAN device and its VTEP entries in the kernel (I/O, pyroute2 messages), Calico-style.

Apply a `RoutingPlan` in this order, each step in the node's network namespace:

1. `ensure_vxlan(plan.vxlan)`: the device (or its removal) — the VTEP entries and routes
   below name it, and deleting the device takes them with it;
2. `reconcile_vteps(plan.vteps)`: per remote VTEP a permanent neighbour entry
   tunnel IP -> MAC and a permanent FDB entry MAC -> node IP, so the onlink routes through the
   device need neither ARP nor learning;
3. `bgp.kernel_routes.reconcile_routes(plan.routes)`.

Like `bgp.kernel_routes`, everything runs in the calling thread's namespace over plain netlink
sockets. The device's MTU can be at most its parent's minus the 50 bytes of VXLAN overhead (the
kernel refuses more): a larger one is lowered to that, and the list of actions says so.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNEIGH,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
)
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.ndmsg import ndmsg

from bgp.kernel_routes import ANY_ERRNO, BATCH, REPLACE, RouteStats, dump
from bgp.routes import VXLAN_DEVICE, VXLAN_OVERHEAD, Vtep, VxlanDevice
from cni.netns import NLM_F_CREATE, NLM_F_EXCL, RequestFailed, Rtnl, link_index
from datastore.errors import TabbyError

IFF_UP = 1
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
IFA_F_NODAD = 0x02
ENOENT, ENODEV = 2, 19
MIN_MTU = 68


class VxlanError(TabbyError):
    """The device could not be made as asked; str() says what and why."""


# the route reconciler's counters; here they count kernel entries: a VTEP is two (its
# neighbour entry and its FDB entry)
VtepStats = RouteStats


def _msg(cls: Any, attrs: list[tuple[str, Any]], **fields: Any) -> Any:
    msg = cls()
    for key, value in fields.items():
        msg[key] = value
    msg["attrs"] = attrs
    return msg


def _commit(nl: Rtnl) -> None:
    try:
        nl.commit()
    except RequestFailed as exc:
        raise VxlanError(f"{exc.what}: {exc.strerror}") from exc


def _get_link(nl: Rtnl, name: str) -> Any | None:
    nl.queue(_msg(ifinfmsg, [("IFLA_IFNAME", name)]), RTM_GETLINK, 0, f"looking up {name}",
             ignore=(ENODEV,))
    reply = nl.commit()[0].reply
    if reply is None:
        return None
    link = ifinfmsg(reply)
    link.decode()
    return link


def _vxlan_info(link: Any) -> tuple[str | None, Any]:
    info = link.get("IFLA_LINKINFO")
    if not info:
        return None, None
    return info.get("IFLA_INFO_KIND"), info.get("IFLA_INFO_DATA")


# -- the device --------------------------------------------------------------------------------


def ensure_vxlan(device: VxlanDevice | None, name: str = VXLAN_DEVICE) -> list[str]:
    """Create or fix the VXLAN device (vni, port, local IP, parent = the interface holding the
    local IP, no learning, MAC, MTU, the tunnel address as /32, up); None removes the device
    `name` if it exists. Returns what it did ([] when all was right); raises VxlanError when
    the device cannot be made (no interface holds the node IP, the kernel refuses)."""
    actions: list[str] = []
    with Rtnl() as nl:
        link = _get_link(nl, device.name if device else name)
        if device is None:
            if link is not None:
                _delete(nl, link["index"], name)
                actions.append(f"removed {name}")
            return actions
        parent_index, parent_name, parent_mtu = _parent(device.local_ip)
        mtu = device.mtu
        if mtu > parent_mtu - VXLAN_OVERHEAD:
            mtu = parent_mtu - VXLAN_OVERHEAD
            actions.append(f"MTU {device.mtu} is more than {parent_name} (MTU {parent_mtu}) "
                           f"allows; using {mtu}")
        if mtu < MIN_MTU:
            raise VxlanError(f"{device.name}: MTU {mtu} is below {MIN_MTU}")
        if link is not None:
            wrong = _wrong(link, device, parent_index)
            if wrong:
                _delete(nl, link["index"], device.name)
                actions.append(f"removed {device.name} ({wrong})")
                link = None
        if link is None:
            index = _create(nl, device, parent_index, mtu)
            actions.append(f"created {device.name} (vni {device.vni}, dstport {device.port}, "
                           f"local {device.local_ip}, dev {parent_name}, mtu {mtu})")
        else:
            index = link["index"]
            actions += _fix_link(nl, link, device, mtu)
        actions += _fix_addresses(nl, index, device)
        if link is None or not link["flags"] & IFF_UP:
            _queue_up(nl, index, device.name)
            _commit(nl)
            actions.append(f"set {device.name} up")
    return actions


def _parent(local_ip: str) -> tuple[int, str, int]:
    """The interface holding the node IP: index, name and MTU."""
    for addr in dump(ifaddrmsg, RTM_GETADDR, family=socket.AF_INET):
        if addr.get("IFA_LOCAL") == local_ip:
            index = addr["index"]
            for link in dump(ifinfmsg, RTM_GETLINK):
                if link["index"] == index:
                    return index, link.get("IFLA_IFNAME"), int(link.get("IFLA_MTU"))
    raise VxlanError(f"no interface holds the node IP {local_ip}: the VXLAN device needs it "
                     "as its parent (check the node's IP autodetection)")


def _wrong(link: Any, device: VxlanDevice, parent_index: int) -> str:
    """Why an existing device cannot be fixed in place ("" when it can)."""
    kind, data = _vxlan_info(link)
    if kind != "vxlan" or data is None:
        return f"a {kind or 'plain'} device, not vxlan"
    have = {"vni": data.get("IFLA_VXLAN_ID"), "dstport": data.get("IFLA_VXLAN_PORT"),
            "local": data.get("IFLA_VXLAN_LOCAL"), "dev": data.get("IFLA_VXLAN_LINK"),
            "learning": data.get("IFLA_VXLAN_LEARNING")}
    want = {"vni": device.vni, "dstport": device.port, "local": device.local_ip,
            "dev": parent_index, "learning": 0}
    return ", ".join(f"{key} {have[key]} instead of {want[key]}" for key in want
                     if have[key] != want[key])


def _create(nl: Rtnl, device: VxlanDevice, parent_index: int, mtu: int) -> int:
    data = {"attrs": [("IFLA_VXLAN_ID", device.vni), ("IFLA_VXLAN_LOCAL", device.local_ip),
                      ("IFLA_VXLAN_LINK", parent_index), ("IFLA_VXLAN_PORT", device.port),
                      ("IFLA_VXLAN_LEARNING", 0)]}
    info = {"attrs": [("IFLA_INFO_KIND", "vxlan"), ("IFLA_INFO_DATA", data)]}
    nl.queue(_msg(ifinfmsg, [("IFLA_IFNAME", device.name), ("IFLA_ADDRESS", device.mac),
                             ("IFLA_MTU", mtu), ("IFLA_LINKINFO", info)]),
             RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, f"creating {device.name}")
    nl.queue(_msg(ifinfmsg, [("IFLA_IFNAME", device.name)]), RTM_GETLINK, 0,
             f"looking up {device.name}")
    try:
        answers = nl.commit()
    except RequestFailed as exc:
        raise VxlanError(f"{exc.what}: {exc.strerror}") from exc
    assert answers[1].reply is not None  # a GET that did not fail has a reply
    return link_index(answers[1].reply)


def _fix_link(nl: Rtnl, link: Any, device: VxlanDevice, mtu: int) -> list[str]:
    actions = []
    index = link["index"]
    if (link.get("IFLA_ADDRESS") or "").lower() != device.mac:
        # a vxlan device takes a new MAC only while down
        up = bool(link["flags"] & IFF_UP)
        if up:
            nl.queue(_msg(ifinfmsg, [], index=index, flags=0, change=IFF_UP), RTM_NEWLINK, 0,
                     f"setting {device.name} down")
        nl.queue(_msg(ifinfmsg, [("IFLA_ADDRESS", device.mac)], index=index), RTM_NEWLINK, 0,
                 f"setting the MAC of {device.name}")
        if up:
            _queue_up(nl, index, device.name)
        _commit(nl)
        actions.append(f"set the MAC of {device.name} to {device.mac}")
    if link.get("IFLA_MTU") != mtu:
        nl.queue(_msg(ifinfmsg, [("IFLA_MTU", mtu)], index=index), RTM_NEWLINK, 0,
                 f"setting the MTU of {device.name}")
        _commit(nl)
        actions.append(f"set the MTU of {device.name} to {mtu}")
    return actions


def _fix_addresses(nl: Rtnl, index: int, device: VxlanDevice) -> list[str]:
    """Exactly the tunnel address, as /32, on the device."""
    actions = []
    found = False
    for addr in dump(ifaddrmsg, RTM_GETADDR, family=socket.AF_INET):
        if addr["index"] != index:
            continue
        local, prefixlen = addr.get("IFA_LOCAL"), addr["prefixlen"]
        if (local, prefixlen) == (device.address, 32):
            found = True
            continue
        nl.queue(_msg(ifaddrmsg, [("IFA_LOCAL", local)], family=socket.AF_INET,
                      prefixlen=prefixlen, index=index), RTM_DELADDR, 0,
                 f"removing {local}/{prefixlen} from {device.name}")
        actions.append(f"removed {local}/{prefixlen} from {device.name}")
    if not found:
        nl.queue(_msg(ifaddrmsg, [("IFA_LOCAL", device.address),
                                  ("IFA_ADDRESS", device.address)],
                      family=socket.AF_INET, prefixlen=32, flags=IFA_F_NODAD, index=index),
                 RTM_NEWADDR, REPLACE, f"adding {device.address}/32 to {device.name}")
        actions.append(f"added {device.address}/32 to {device.name}")
    if actions:
        _commit(nl)
    return actions


def _queue_up(nl: Rtnl, index: int, name: str) -> None:
    nl.queue(_msg(ifinfmsg, [], index=index, flags=IFF_UP, change=IFF_UP), RTM_NEWLINK, 0,
             f"setting {name} up")


def _delete(nl: Rtnl, index: int, name: str) -> None:
    nl.queue(_msg(ifinfmsg, [], index=index), RTM_DELLINK, 0, f"deleting {name}",
             ignore=(ENODEV,))
    _commit(nl)


# -- VTEPs -------------------------------------------------------------------------------------


def reconcile_vteps(vteps: Iterable[Vtep], device: str = VXLAN_DEVICE) -> VtepStats:
    """Per remote VTEP a permanent neighbour entry tunnel_ip -> mac on `device` and a permanent
    FDB entry (self) mac -> dst node_ip; entries of the device not wanted are removed.
    Idempotent. A missing device is an error when there are VTEPs, nothing to do otherwise."""
    stats = VtepStats()
    neighbours: dict[str, str] = {}  # tunnel IP -> MAC
    fdb: dict[str, str] = {}  # MAC -> node IP
    for vtep in sorted(set(vteps)):
        mac = vtep.mac.lower()
        if neighbours.get(vtep.tunnel_ip, mac) != mac or fdb.get(mac, vtep.node_ip) \
                != vtep.node_ip:
            stats.errors.append(f"VTEP of {vtep.node}: tunnel IP {vtep.tunnel_ip} or MAC "
                                f"{mac} is also another node's; skipped")
            continue
        neighbours[vtep.tunnel_ip] = mac
        fdb[mac] = vtep.node_ip
    with Rtnl() as nl:
        link = _get_link(nl, device)
        if link is None:
            if neighbours:
                stats.errors.append(f"{device} does not exist")
            return stats
        index = link["index"]
        writes = _neighbour_writes(index, device, neighbours, stats)
        writes += _fdb_writes(index, device, fdb, stats)
        for start in range(0, len(writes), BATCH):
            chunk = writes[start:start + BATCH]
            for msg, msg_type, flags, label, _ in chunk:
                nl.queue(msg, msg_type, flags, label, ignore=ANY_ERRNO)
            for (_, msg_type, _, label, outcome), answer in zip(chunk, nl.commit(),
                                                                strict=True):
                if answer.error == ENOENT and msg_type == RTM_DELNEIGH:
                    continue  # gone already (e.g. a remote an FDB replace rewrote)
                if answer.error:
                    stats.errors.append(f"{label}: {os.strerror(answer.error)}")
                elif outcome:
                    setattr(stats, outcome, getattr(stats, outcome) + 1)
    return stats


Write = tuple[Any, int, int, str, str]  # message, type, netlink flags, label, stats field


def _neighbour_writes(index: int, device: str, wanted: dict[str, str], stats: VtepStats
                      ) -> list[Write]:
    have = {}
    for entry in dump(ndmsg, RTM_GETNEIGH, family=socket.AF_INET):
        if entry["ifindex"] == index and entry.get("NDA_DST"):
            have[entry.get("NDA_DST")] = ((entry.get("NDA_LLADDR") or "").lower(),
                                          entry["state"])
    writes: list[Write] = []
    for ip, mac in wanted.items():
        old = have.get(ip)
        if old is not None and old[0] == mac and old[1] & NUD_PERMANENT:
            stats.unchanged += 1
            continue
        writes.append((_msg(ndmsg, [("NDA_DST", ip), ("NDA_LLADDR", mac)],
                            family=socket.AF_INET, ifindex=index, state=NUD_PERMANENT),
                       RTM_NEWNEIGH, REPLACE, f"neighbour {ip} lladdr {mac} dev {device}",
                       "added" if old is None else "replaced"))
    for ip in have.keys() - wanted.keys():
        writes.append((_msg(ndmsg, [("NDA_DST", ip)], family=socket.AF_INET, ifindex=index),
                       RTM_DELNEIGH, 0, f"deleting neighbour {ip} dev {device}", "removed"))
    return writes


def _fdb_writes(index: int, device: str, wanted: dict[str, str], stats: VtepStats
                ) -> list[Write]:
    have: dict[str, dict[str, int]] = {}  # MAC -> remote node IP -> state
    for entry in dump(ndmsg, RTM_GETNEIGH, family=socket.AF_BRIDGE):
        dst = entry.get("NDA_DST")
        if entry["ifindex"] == index and dst and _unicast_v4(dst):
            mac = (entry.get("NDA_LLADDR") or "").lower()
            have.setdefault(mac, {})[dst] = entry["state"]
    writes: list[Write] = []

    def fdb(mac: str, dst: str, msg_type: int, flags: int, label: str, outcome: str) -> None:
        writes.append((_msg(ndmsg, [("NDA_LLADDR", mac), ("NDA_DST", dst)],
                            family=socket.AF_BRIDGE, ifindex=index, flags=NTF_SELF,
                            state=NUD_PERMANENT),
                       msg_type, flags, label, outcome))

    for mac, node_ip in wanted.items():
        remotes = have.get(mac, {})
        if set(remotes) == {node_ip} and remotes[node_ip] & NUD_PERMANENT:
            stats.unchanged += 1
            continue
        fdb(mac, node_ip, RTM_NEWNEIGH, REPLACE, f"fdb {mac} dst {node_ip} dev {device}",
            "replaced" if remotes else "added")
        for dst in remotes.keys() - {node_ip}:
            # the replace may already have rewritten this remote: then ENOENT, and no count
            fdb(mac, dst, RTM_DELNEIGH, 0, f"deleting fdb {mac} dst {dst} dev {device}", "")
    for mac in have.keys() - wanted.keys():
        for dst in have[mac]:
            fdb(mac, dst, RTM_DELNEIGH, 0, f"deleting fdb {mac} dst {dst} dev {device}",
                "removed")
    return writes


def _unicast_v4(text: str) -> bool:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return ip.version == 4 and not ip.is_multicast
